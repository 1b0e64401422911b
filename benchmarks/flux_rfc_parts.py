"""What RFC adds to TaylorSeer's time on ``flux_speed.py --cpu``'s FLUX-like model: its predictor or its schedule.

RFC is RFE (the predictor) on RCS's full steps (the schedule). Timed in one run, interleaved per round (eager):
TaylorSeer and RFE alone on an interval of NFC 8, the same two on exactly the full steps RFC picks at
``target_nfc=8``, and RFC.
RFE against TaylorSeer on RFC's steps is the predictor's cost; RFC against RFE on its own steps is the schedule's.
``--profile`` then profiles (torch.profiler) TaylorSeer's and RFE's full calls from the third full step on and their
cached calls from step 6 on, on RFC's steps: median wall time per call and each operator's self time per call.

    python benchmarks/flux_rfc_parts.py --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from flux_cpu_profile import print_table, profile_calls
from flux_speed import CPU, build, generate, inputs, prime

import relcache
from relcache import RFC, CacheConfig, Interval, Relational, Steps, Taylor

IMAGE, TEXT, STEPS, NFC = 576, 64, 28, 8


def run(model: Any, fixed: dict[str, torch.Tensor], config: CacheConfig) -> tuple[float, list[int]]:
    """One primed generation's seconds and full steps."""
    relcache.enable(model, config)
    try:
        prime(model, fixed, IMAGE, STEPS, "cpu", torch.float32)
        start = time.perf_counter()
        generate(model, fixed, IMAGE, STEPS, "cpu", torch.float32)
        return time.perf_counter() - start, list(relcache.stats(model).full_steps)
    finally:
        relcache.disable(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile full and cached calls")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model = build(CPU, "cpu", torch.float32)
    fixed = inputs(model, IMAGE, TEXT, "cpu", torch.float32)
    _, steps = run(model, fixed, RFC(target_nfc=NFC))
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}; FLUX-like 2+4 blocks, "
          f"{IMAGE}+{TEXT} tokens, {STEPS} steps, float32; RFC's full steps {steps}")
    configs = {
        "TaylorSeer, interval": CacheConfig(Taylor(2), Interval(4, 2)),
        "RFE alone, interval": CacheConfig(Relational(2), Interval(4, 2)),
        "TaylorSeer, RFC's steps": CacheConfig(Taylor(2), Steps(tuple(steps))),
        "RFE alone, RFC's steps": CacheConfig(Relational(2), Steps(tuple(steps))),
        "RFC": RFC(target_nfc=NFC),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, config in configs.items():
            t, full = run(model, fixed, config)
            times[name].append(t)
            print(f"  round {r}: {name}: {t:.3f} s, full steps {full}", flush=True)
    base = times["TaylorSeer, RFC's steps"]
    print("\n| method | median s | over TaylorSeer on RFC's steps, per round: median | range |\n|---|---|---|---|")
    for name, ts in times.items():
        q = [t / b - 1 for t, b in zip(ts, base, strict=True)]
        print(f"| {name} | {statistics.median(ts):.3f} | {100 * statistics.median(q):+.1f} % | "
              f"{100 * min(q):+.1f} to {100 * max(q):+.1f} % |")
    if args.profile:
        for which in ("full", "cached"):
            for name, pred in (("TaylorSeer", Taylor(2)), ("RFE alone", Relational(2))):
                select = (lambda i, full: i in sorted(full)[2:]) if which == "full" else (
                    lambda i, full: i not in full and i >= 6)
                walls, ops, _ = profile_calls(model, fixed, CacheConfig(pred, Steps(tuple(steps))), select)
                print_table(f"{name}, {which} calls", walls, ops)


if __name__ == "__main__":
    main()
