"""Where the first call of a compiled generation goes: a benchmark, not a test.

A new generation's first transformer call records into empty caches and, with batch modulation, tabulates the
generation's adaLN projections. Until 2026-12-03 it ran eagerly in every generation; now it replays a graph that the
first generation compiled for it (``StepCalls.rehearse``, docs/how-it-works.md, "Compiled steps"), and only the table
stays eager. This compiles a DiT (random weights, batch 2, DDIM) with one of ``speed.py``'s methods enabled, runs
``--generations`` untimed generations, then profiles the first call of one more and prints torch.profiler's table,
with the median compiled call of that generation for comparison.

    python benchmarks/first_call.py --models B --method "RFC m=2" --batch-modulation
"""

from __future__ import annotations

import argparse
import warnings

import torch
from speed import INTERVAL_FOR_NFC, SIZES, Breakdown, build, generate, methods

import relcache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="B", choices=list(SIZES))
    parser.add_argument("--method", default="RFC m=2", choices=list(methods(14, None)))
    parser.add_argument("--budget", type=int, default=14, choices=list(INTERVAL_FOR_NFC))
    parser.add_argument("--batch-modulation", action="store_true")
    parser.add_argument("--generations", type=int, default=2, help="untimed generations before the profiled one")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=18, help="rows of the profiler's table")
    args = parser.parse_args()
    if args.generations < 1:
        parser.error("--generations must be at least 1: the first generation compiles every kind of step")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.models, torch.float32, "cpu")
    relcache.enable(model, methods(args.budget, None)[args.method], batch_modulation=args.batch_modulation)
    compiled = torch.compile(model)
    prof = torch.profiler.profile()
    calls: list[float] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
        for _ in range(args.generations):
            generate(compiled, 50, "cpu", torch.float32)
        generate(compiled, 50, "cpu", torch.float32, log=calls, around=lambda i: prof if i == 0 else None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    b = Breakdown(calls, relcache.stats(model).full_steps)
    print(f"DiT-{args.models}/2, {args.method}{' + batch modulation' if args.batch_modulation else ''}, compiled: "
          f"first call {b.first_ms:.0f} ms (profiled), later full calls {b.full_ms:.1f} ms, cached calls "
          f"{b.cached_ms:.1f} ms (medians; nan: none)")


if __name__ == "__main__":
    main()
