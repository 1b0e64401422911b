"""What relcache adds to a full step: the plain model against methods whose every step is full, interleaved.

A full step with relcache records: the module outputs into the caches (every method), the divided differences
(TaylorSeer, RFE), and RFE's input and ratio (two per-sample norms); RCS also runs its pre-pass and decision.
``speed.py --breakdown`` shows this as "full calls over a plain step" from one generation (noisy); here each
method runs every step full (an Interval of 1; RCS with threshold 0), each on its own copy of speed.py's DiT,
and rounds of a 16-step generation per method alternate, so the medians of many calls compare like with like.

    python benchmarks/full_step_overhead.py --models B --compile default --rounds 8
    python benchmarks/full_step_overhead.py --models B --rounds 4    # eager
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from speed import SIZES, build, machine_line

import relcache
from relcache import CacheConfig, Interval, Relational, Reuse, Taylor

METHODS: dict[str, CacheConfig | None] = {
    "plain": None,
    "FORA, every step full": CacheConfig(Reuse(), Interval(1, 1)),
    "TaylorSeer m=2, every step full": CacheConfig(Taylor(2), Interval(1, 1)),
    "RFE m=2, every step full": CacheConfig(Relational(2), Interval(1, 1)),
    "RFC m=2, threshold 0 (every step full)": relcache.RFC(threshold=0.0, warmup=1),
}
STEPS = 16
SKIP = 2  # calls of each generation left out: the first records into empty caches, the second into one difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="B", choices=list(SIZES))
    parser.add_argument("--compile", metavar="MODE", help="torch.compile(model, mode=MODE) after enabling")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be positive integers, got {args.rounds}, {args.threads}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    base = build(args.models, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    labels = torch.tensor([207, 1000])
    runs = {}
    for name, config in METHODS.items():
        model = copy.deepcopy(base)
        if config is not None:
            relcache.enable(model, config)
        runs[name] = (model, torch.compile(model, mode=args.compile) if args.compile else model, config)

    def generation(name: str) -> list[float]:
        model, call, config = runs[name]
        if config is not None:
            relcache.begin_generation(model, num_steps=STEPS)
        times = []
        with torch.no_grad():
            for i in range(STEPS):
                start = time.perf_counter()
                call(x + 0.01 * i, timestep=torch.full((2,), 999 - 20 * i), class_labels=labels)
                times.append(time.perf_counter() - start)
        return times[SKIP:]

    kind = f"compiled (mode={args.compile})" if args.compile else "eager"
    print(f"{machine_line(args.threads)}; DiT-{args.models}/2 float32 batch 2, {kind}, "
          f"{args.rounds} rounds of {STEPS}-step generations, calls {SKIP}..{STEPS - 1} of each timed", flush=True)
    for name in METHODS:  # compiles each kind of step, and warms the caches
        start = time.perf_counter()
        generation(name)
        generation(name)
        print(f"  warmed {name} in {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name in METHODS:
            times[name] += generation(name)
    plain = statistics.median(times["plain"])
    print("| step | ms (median) | over a plain step | calls | full steps |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        model, _, config = runs[name]
        full = f"{len(relcache.stats(model).full_steps)} of {STEPS}" if config is not None else "-"
        rows[name] = {"ms": 1e3 * med, "over_plain": med / plain - 1, "calls": len(ts)}
        print(f"| {name} | {1e3 * med:.1f} | {100 * (med / plain - 1):+.1f} % | {len(ts)} | {full} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "model": args.models, "compile": args.compile,
                                        "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
