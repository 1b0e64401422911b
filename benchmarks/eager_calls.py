"""Where an eager generation's time goes, per kind of call: full and cached calls of each method against a plain step.

``speed.py`` derives one "cached step / full step" number from whole-generation times, which lumps together what a
method adds to its full calls (RFE's record, RCS's input error) and what its cached calls cost. Here every
transformer call of a generation is timed (``speed.generate``'s per-call log), the methods interleaved round by
round on one model, and each call is labelled full or cached from ``relcache.stats(...).full_steps``. Reported, per
method: the median full call and median cached call in ms and as a share of the plain model's median step (timed in
the same rounds), and what the whole generation's calls add up to. ``--profile`` adds, for the listed methods, the
operators of one more generation (torch.profiler, self CPU time per operator, summed over its calls) split by kind
of call.

    python benchmarks/eager_calls.py --models B --repeats 3
    python benchmarks/eager_calls.py --models B --repeats 3 --methods "TaylorSeer m=2" "RFC m=2" --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from speed import SIZES, build, generate, interval_for, machine_line, methods, prime

import relcache


def _calls(model: torch.nn.Module, steps: int, images: int) -> list[float]:
    log: list[float] = []
    generate(model, steps, "cpu", torch.float32, images, log=log)
    return log


def _profile(model: torch.nn.Module, steps: int, images: int, full: set[int], top: int) -> dict[str, list]:
    """Self CPU time per operator (ms, summed over the calls of each kind) in one generation."""
    tables: dict[str, dict[str, float]] = {"full": {}, "cached": {}}
    prof = {}

    def around(i: int) -> torch.profiler.profile:
        prof[i] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        return prof[i]

    generate(model, steps, "cpu", torch.float32, images, around=around)
    for i, p in prof.items():
        table = tables["full" if i in full else "cached"]
        for ev in p.key_averages():
            table[ev.key] = table.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e3
    return {kind: sorted(t.items(), key=lambda kv: -kv[1])[:top] for kind, t in tables.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["B"], choices=sorted(SIZES))
    parser.add_argument("--budget", type=int, default=14, choices=[14, 11, 10, 8, 7])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["FORA", "TaylorSeer m=2", "RFC m=2"])
    parser.add_argument("--profile", action="store_true", help="also profile one generation of each method")
    parser.add_argument("--top", type=int, default=12, help="operators listed per kind of call with --profile")
    parser.add_argument("--out", default=None, help="a JSON file for the numbers")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    configs = methods(args.budget, None, args.steps)
    unknown = [m for m in args.methods if m not in configs]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(configs)}")
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    out: dict[str, object] = {"machine": machine_line(args.threads), "models": {}}
    for size in args.models:
        model = build(size, torch.float32, "cpu")
        plain: list[float] = []
        calls: dict[str, list[list[float]]] = {m: [] for m in args.methods}
        full: dict[str, set[int]] = {}
        for _ in range(args.repeats):  # interleaved: the machine's drift falls on all alike
            plain += _calls(model, args.steps, args.images)
            for name in args.methods:
                relcache.enable(model, configs[name])
                try:
                    prime(model, args.steps, "cpu", torch.float32, args.images)
                    calls[name].append(_calls(model, args.steps, args.images))
                    full[name] = set(relcache.stats(model).full_steps)
                finally:
                    relcache.disable(model)
        step = statistics.median(plain)
        print(f"\nDiT-{size}/2, budget {args.budget}: NFC {interval_for(args.budget, args.steps)[1]} of {args.steps}, "
              f"{args.repeats} rounds; plain step median "
              f"{step * 1e3:.1f} ms")
        print("| method | full calls | full call ms | / plain step | cached call ms | / plain step | "
              "generation s (median) |")
        print("|---|---|---|---|---|---|---|")
        rows = {}
        for name in args.methods:
            f = [t for log in calls[name] for i, t in enumerate(log) if i in full[name]]
            c = [t for log in calls[name] for i, t in enumerate(log) if i not in full[name]]
            gen = statistics.median(sum(log) for log in calls[name])
            fm, cm = statistics.median(f), statistics.median(c)
            rows[name] = dict(full_steps=sorted(full[name]), full_ms=fm * 1e3, cached_ms=cm * 1e3,
                              full_share=fm / step, cached_share=cm / step, generation_s=gen)
            print(f"| {name} | {len(full[name])} | {fm * 1e3:.1f} | {100 * fm / step:.1f} % | {cm * 1e3:.1f} | "
                  f"{100 * cm / step:.1f} % | {gen:.2f} |")
        out["models"][size] = dict(plain_step_ms=step * 1e3, rows=rows)
        if args.profile:
            for name in args.methods:
                relcache.enable(model, configs[name])
                try:
                    prime(model, args.steps, "cpu", torch.float32, args.images)
                    tables = _profile(model, args.steps, args.images, full[name], args.top)
                finally:
                    relcache.disable(model)
                for kind, table in tables.items():
                    print(f"\n{name}, {kind} calls: self CPU ms summed over the generation")
                    print("| operator | ms |\n|---|---|")
                    for op, ms in table:
                        print(f"| {op} | {ms:.1f} |")
                rows[name]["profile"] = tables
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
