"""Where the first call of a compiled generation goes: a benchmark, not a test.

A new generation's first transformer call runs eagerly (its context allocates the caches; docs/how-it-works.md,
"Compiled steps"), so under ``torch.compile`` it costs more than a compiled step. This compiles a DiT (random
weights, batch 2, DDIM) with one of ``speed.py``'s methods enabled, runs ``--generations`` untimed generations, then
profiles the first call of one more and prints torch.profiler's table, with the median compiled call of that
generation for comparison.

    python benchmarks/first_call.py --models B --method "RFC m=2" --batch-modulation
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from diffusers import DDIMScheduler
from speed import INTERVAL_FOR_NFC, SIZES, build, class_labels, methods

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
    labels = class_labels(1, "cpu")

    def generation(profile: bool = False) -> list[float]:
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        scheduler.set_timesteps(50)
        relcache.begin_generation(model, timesteps=scheduler.timesteps)
        x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        calls = []
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                prof = torch.profiler.profile() if profile and i == 0 else None
                start = time.perf_counter()
                if prof is not None:
                    with prof:
                        eps = compiled(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample[:, :4]
                else:
                    eps = compiled(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample[:, :4]
                calls.append(time.perf_counter() - start)
                if prof is not None:
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                    max_name_column_width=50))
                cond, uncond = eps.chunk(2)
                x = scheduler.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample
        return calls

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
        for _ in range(args.generations):
            generation()
        calls = generation(profile=True)
    full = set(relcache.stats(model).full_steps)

    def median_ms(picked: list[float]) -> str:
        return f"{1e3 * statistics.median(picked):.1f} ms" if picked else "none"

    later_full = [c for i, c in enumerate(calls) if i in full and i > 0]
    cached = [c for i, c in enumerate(calls) if i not in full]
    print(f"DiT-{args.models}/2, {args.method}{' + batch modulation' if args.batch_modulation else ''}, compiled: "
          f"first call {1e3 * calls[0]:.0f} ms (profiled), later full calls {median_ms(later_full)}, cached calls "
          f"{median_ms(cached)} (medians)")


if __name__ == "__main__":
    main()
