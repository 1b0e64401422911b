"""relcache's own bookkeeping around each transformer call, and the call's time, where the host sets a step's pace.

On a GPU a compiled cached step's kernels are few and small, so the step waits on its host: dynamo's guards,
inductor's wrapper, and relcache's Python before the forward (``start_call``: the step's context, the schedule's
decision and the step's rows, batch modulation's row) and after it (``end_call``: counters, the cache peak). This
script times both ends on every call of 50-step generations of a DiT with XL/2's 28 blocks and a tiny width
(``host_bound.build``, one CPU thread), with ``time.perf_counter`` around ``StepCalls.start_call`` and
``StepCalls.end_call``, and each call's wall time; compiled (inductor) unless ``--eager``, with batch modulation
unless ``--no-batch-modulation``. Calls are split into full and cached ones by ``relcache.stats``; the table gives
medians over calls of the per-generation medians. To compare two versions of relcache, run it under each
(``PYTHONPATH=<checkout>/src``), alternating, and summarise the runs' JSON outputs with ``--summary``.

    python benchmarks/call_bookkeeping.py --repeats 5 --out benchmarks/results/<dir>/call_bookkeeping.json
    python benchmarks/call_bookkeeping.py --summary "before=<dir>/*_before*.json" "after=<dir>/*_after*.json"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from compiled_host import STEPS, generate
from host_bound import build
from speed import machine_line

import relcache
from relcache.runtime.calls import StepCalls

METHODS = {"FORA": lambda: relcache.FORA(4), "TaylorSeer m=2": lambda: relcache.TaylorSeer(4, 2),
           "RFC m=2": lambda: relcache.RFC(order=2, target_nfc=14)}
PARTS = ("start_call", "end_call")


def timed_generation(model: torch.nn.Module, enabled: torch.nn.Module) -> dict[str, dict[str, float]]:
    """One generation: per kind of step (full, cached), the medians of ``start_call`` and ``end_call`` in µs and of
    the whole call in ms."""
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    originals = {part: getattr(StepCalls, part) for part in PARTS}

    def timing(part: str) -> Any:
        original = originals[part]

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                times[part].append((time.perf_counter() - start) * 1e6)
        return run

    calls: list[float] = []
    for part in PARTS:
        setattr(StepCalls, part, timing(part))
    try:
        generate(model, log=calls)
    finally:
        for part, original in originals.items():
            setattr(StepCalls, part, original)
    if any(len(t) != STEPS for t in times.values()) or len(calls) != STEPS:  # a rehearsed first call starts twice
        for part in PARTS:
            times[part] = times[part][-STEPS:]
    full = set(relcache.stats(enabled).contexts["default"].full_steps)
    out: dict[str, dict[str, float]] = {}
    for kind in ("full", "cached"):
        steps = [i for i in range(STEPS) if (i in full) == (kind == "full") and i > 0]  # not the first call
        out[kind] = {part: statistics.median(times[part][i] for i in steps) for part in PARTS}
        out[kind]["call_ms"] = statistics.median(calls[i] * 1e3 for i in steps)
        out[kind]["calls"] = len(steps)
    return out


def summary(groups: list[str]) -> None:
    """Per method and kind, the medians over runs of each group (``LABEL=GLOB`` of JSON outputs): relcache's
    bookkeeping (``start_call`` plus ``end_call``) and the call."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for group in groups:
        label, _, pattern = group.partition("=")
        paths = sorted(Path().glob(pattern))
        if not label or not paths:
            raise SystemExit(f"--summary takes LABEL=GLOB of JSON outputs; {group!r} names none")
        runs[label] = [json.loads(p.read_text())["results"] for p in paths]
    labels = list(runs)
    print("| method | step | " + " | ".join(f"{lb}: bookkeeping, µs | {lb}: call, ms" for lb in labels) + " |")
    print("|---|---|" + "---|---|" * len(labels))
    first = runs[labels[0]][0]
    for name in first:
        for kind in first[name]:
            cells = []
            for label in labels:
                rs = [r[name][kind] for r in runs[label]]
                cells.append(f"{statistics.median(r['start_call'] + r['end_call'] for r in rs):.1f} | "
                             f"{statistics.median(r['call_ms'] for r in rs):.3f}")
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    print("(medians over " + ", ".join(f"{len(runs[lb])} {lb} runs" for lb in labels) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", nargs="+", metavar="LABEL=GLOB",
                        help="time nothing: summarise earlier JSON outputs, a column pair per label")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="time eager generations (default: compiled)")
    parser.add_argument("--no-batch-modulation", dest="batch_modulation", action="store_false")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    head = (f"{machine_line(1)}; relcache from {Path(relcache.__file__).parent}; DiT at XL/2 depth (28 blocks), "
            f"hidden 16, batch 2, {'eager' if args.eager else 'compiled (inductor)'}, "
            f"{'batch modulation' if args.batch_modulation else 'no batch modulation'}, {STEPS}-step generations, "
            f"medians of {args.repeats}")
    print(head, flush=True)
    print("| method | step | calls | start_call, µs | end_call, µs | call, ms |")
    print("|---|---|---|---|---|---|")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, make in METHODS.items():
        enabled = build()
        relcache.enable(enabled, make(), batch_modulation=args.batch_modulation)
        model = enabled if args.eager else torch.compile(enabled)
        for _ in range(2):  # warm: compiled graphs, a rehearsed first call
            generate(model)
        runs = [timed_generation(model, enabled) for _ in range(args.repeats)]
        relcache.disable(enabled)
        results[name] = {}
        for kind in ("full", "cached"):
            row = {key: statistics.median(r[kind][key] for r in runs) for key in (*PARTS, "call_ms", "calls")}
            results[name][kind] = row
            print(f"| {name} | {kind} | {int(row['calls'])} | {row['start_call']:.1f} | {row['end_call']:.1f} | "
                  f"{row['call_ms']:.3f} |", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"head": head, "results": results}, indent=1))


if __name__ == "__main__":
    main()
