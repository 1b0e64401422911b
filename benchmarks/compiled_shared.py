"""Does a compiled model slow down once more compiled models live in the same process? A diagnostic, not a test.

``speed.py --compile`` keeps every method's compiled copy in one process and found compiled RFC 11 % slower there
than compiled alone (``compiled_alone.py``). This script separates the candidate causes in one process:

1. compile RFC and TaylorSeer (each on its own copy of the model) and time them in turn, ``--rounds`` times;
2. compile ``--others`` more models (the plain model, FORA, TaylorSeer and RFC without batch modulation, FORA with
   it: what ``speed.py`` also holds) and time the *same* two compiled objects again;
3. compile RFC once more, now after all the others, and time it beside the first RFC and TaylorSeer.

If only RFC slows, and only the copy compiled last, the compile order is the cause; if both slow alike in round 2,
it is the process's state. Per generation it also prints the page faults the process took (``getrusage``), since
freshly touched memory faults on a VM.

    python benchmarks/compiled_shared.py --models B --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import time

import torch
from speed import INTERVAL_FOR_NFC, SIZES, build, generate, interval_for, methods

import relcache

OTHERS = [("plain", False), ("FORA", False), ("TaylorSeer m=2", False), ("RFC m=2", False), ("FORA", True)]


def compiled(base: torch.nn.Module, name: str, batch_modulation: bool, budget: int, steps: int) -> torch.nn.Module:
    """A compiled copy of ``base`` with ``name`` enabled (none for "plain"), warmed by one generation."""
    model = copy.deepcopy(base)
    if name != "plain":
        relcache.enable(model, methods(budget, None, steps)[name], batch_modulation=batch_modulation)
    fn = torch.compile(model)
    start = time.perf_counter()
    generate(fn, steps, "cpu", torch.float32)
    print(f"compiled {name}{' + batch modulation' if batch_modulation else ''}: first generation "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return fn


def timed(fn: torch.nn.Module, steps: int) -> tuple[float, int]:
    """One generation's wall time and the page faults (minor and major) the process took during it."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    generate(fn, steps, "cpu", torch.float32)
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return took, (after.ru_minflt - before.ru_minflt) + (after.ru_majflt - before.ru_majflt)


def rounds(label: str, fns: dict[str, torch.nn.Module], n: int, steps: int) -> None:
    """Time every compiled model in ``fns`` in turn, ``n`` rounds; print each one's times, faults and median."""
    got: dict[str, list[tuple[float, int]]] = {key: [] for key in fns}
    for _ in range(n):
        for key, fn in fns.items():
            got[key].append(timed(fn, steps))
    print(f"\n{label}")
    for key, runs in got.items():
        times = ", ".join(f"{t:.2f}" for t, _ in runs)
        faults = ", ".join(str(f) for _, f in runs)
        print(f"  {key}: {times} s (median {statistics.median(t for t, _ in runs):.2f}); page faults {faults}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["B"], choices=list(SIZES))
    parser.add_argument("--budget", type=int, default=14, choices=list(INTERVAL_FOR_NFC))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="timed generations of each model per round (>= 1)")
    parser.add_argument("--others", type=int, default=len(OTHERS), choices=range(len(OTHERS) + 1),
                        help="how many more compiled models to create before the second round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, budget {args.budget}: NFC "
          f"{interval_for(args.budget, args.steps)[1]} of {args.steps}, batch modulation "
          f"on for the RFC and TaylorSeer under test; glibc malloc settings: {malloc or 'defaults'}")
    for size in args.models:
        print(f"\nDiT-{size}/2")
        base = build(size, torch.float32, "cpu")
        torch._dynamo.reset()
        first = {"RFC": compiled(base, "RFC m=2", True, args.budget, args.steps),
                 "TaylorSeer": compiled(base, "TaylorSeer m=2", True, args.budget, args.steps)}
        rounds("1. the two alone", first, args.rounds, args.steps)
        others = [compiled(base, name, bm, args.budget, args.steps) for name, bm in OTHERS[:args.others]]
        rounds(f"2. the same two again, after {len(others)} more compiled models", first, args.rounds, args.steps)
        last = {"RFC compiled last": compiled(base, "RFC m=2", True, args.budget, args.steps), **first}
        rounds("3. RFC compiled once more, then all three", last, args.rounds, args.steps)
        del others, first, last
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
