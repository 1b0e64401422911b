"""Compiled generations one method at a time: each method on its own copy of the model, compiled after a
``torch._dynamo.reset()``, so no compiled model shares dynamo's caches with another (``speed.py --compile`` holds
every method's compiled copy in one process). Per generation: total time, the mean full and cached step (from
forward hooks), and the graphs compiled during it (0 after the first generation means no recompilation).

    python benchmarks/compiled_alone.py --models B --methods "TaylorSeer m=2" "RFC m=2" --batch-modulation

The plain model (compiled the same way) is timed first; "% of ideal" is (plain time / method time) / (T / NFC),
with times the median of the generations after the first.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from speed import SIZES, build, generate, interval_for, methods

import relcache


def run(model: torch.nn.Module, steps: int, generations: int, label: str, enabled: bool) -> list[float]:
    """Compile ``model``, run ``generations`` generations, print each one's line; the totals."""
    compiled = torch.compile(model)
    marks: list[float] = []
    mark = torch.compiler.disable(lambda *_: marks.append(time.perf_counter()))  # outside the graphs, not traced
    hooks = [model.register_forward_pre_hook(mark), model.register_forward_hook(mark)]
    totals = []
    try:
        for g in range(generations):
            marks.clear()
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            generate(compiled, steps, "cpu", torch.float32)
            totals.append(time.perf_counter() - start)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
            ms = [(marks[2 * i + 1] - marks[2 * i]) * 1e3 for i in range(len(marks) // 2)]
            full = relcache.stats(model).full_steps if enabled else list(range(steps))
            cached = [t for i, t in enumerate(ms) if i not in full]
            mean_full = statistics.mean(ms[i] for i in full)
            line = f"{label} generation {g}: {totals[-1]:.2f} s, full step {mean_full:.1f} ms"
            if cached:
                line += f", cached step {statistics.mean(cached):.1f} ms"
            print(line + f", graphs compiled {graphs}", flush=True)
    finally:
        for h in hooks:
            h.remove()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["B"], choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=["TaylorSeer m=2", "RFC m=2"])
    parser.add_argument("--budget", type=int, default=14)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--generations", type=int, default=3, help="the first compiles; the rest are timed")
    parser.add_argument("--batch-modulation", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, budget {args.budget}: NFC "
          f"{interval_for(args.budget, args.steps)[1]} of {args.steps}")
    for size in args.models:
        base = build(size, torch.float32, "cpu")
        torch._dynamo.reset()
        plain = statistics.median(run(copy.deepcopy(base), args.steps, args.generations, "plain", False)[1:])
        rows = []
        for name in args.methods:
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            relcache.enable(model, methods(args.budget, None, args.steps)[name],
                            batch_modulation=args.batch_modulation)
            try:
                t = statistics.median(run(model, args.steps, args.generations, name, True)[1:])
            finally:
                relcache.disable(model)
            rows.append((name, t))
        ideal = args.steps / interval_for(args.budget, args.steps)[1]  # (found by review: the budget's NFC of 50)
        print(f"\nDiT-{size}/2 compiled alone{' + batch modulation' if args.batch_modulation else ''}: plain "
              f"{plain:.2f} s\n| method | time s | speed-up | % of ideal |\n|---|---|---|---|")
        for name, t in rows:
            print(f"| {name} | {t:.2f} | {plain / t:.2f}x | {100 * plain / t / ideal:.1f} |")


if __name__ == "__main__":
    main()
