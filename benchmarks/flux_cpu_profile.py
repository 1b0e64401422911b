"""Where a cached step's time goes on ``flux_speed.py --cpu``'s FLUX-like model: TaylorSeer against RFC, eager.

Each method (NFC 8 of 28, as ``flux_speed.py``'s 3.5x rows) is enabled, primed and run for one generation, then run
for a second one in which every cached call from step 6 to 26 is profiled (torch.profiler, CPU): the median wall time
of those calls and each operator's self time per call. Companion of ``cached_step.py --profile`` for DiT.

    python benchmarks/flux_cpu_profile.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from flux_speed import CPU, build, generate, inputs, prime
from torch.profiler import profile

import relcache
from relcache import RFC, TaylorSeer

IMAGE, TEXT, STEPS = 576, 64, 28


def profile_calls(model: Any, fixed: dict[str, torch.Tensor], config: relcache.CacheConfig,
                  select: Callable[[int, set[int]], bool]) -> tuple[list[float], dict[str, list[float]], set[int]]:
    """Enable ``config``, prime it and run one generation, then profile each call ``i`` of a second one for which
    ``select(i, full steps of the first)`` holds. Returns the profiled calls' wall times, each operator's
    ``[self µs, count]`` summed over them, and the full steps."""
    relcache.enable(model, config)
    prime(model, fixed, IMAGE, STEPS, "cpu", torch.float32)
    generate(model, fixed, IMAGE, STEPS, "cpu", torch.float32)
    full = set(relcache.stats(model).full_steps)
    forward, call, walls, ops = model.forward, [0], [], {}

    def profiled(*args: Any, **kwargs: Any) -> Any:
        i = call[0]
        call[0] += 1
        if not select(i, full):
            return forward(*args, **kwargs)
        with profile() as prof:
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            walls.append(time.perf_counter() - start)
        for e in prof.key_averages():
            got = ops.setdefault(e.key, [0.0, 0])
            got[0] += e.self_cpu_time_total
            got[1] += e.count
        return out

    model.forward = profiled
    try:
        generate(model, fixed, IMAGE, STEPS, "cpu", torch.float32)
    finally:
        del model.forward
        relcache.disable(model)
    return walls, ops, full


def print_table(title: str, walls: list[float], ops: dict[str, list[float]], top: int = 12) -> None:
    """The profiled calls' median wall time, self time, and the ``top`` operators' self time per call."""
    n = len(walls)
    self_ms = sum(t for t, _ in ops.values()) / n / 1e3
    print(f"\n{title}; {n} calls profiled, median {1e3 * statistics.median(walls):.1f} ms; self time per call "
          f"{self_ms:.1f} ms")
    print("| operator | ms per call | calls per call |\n|---|---|---|")
    for key, (t, c) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {key} | {t / n / 1e3:.2f} | {c / n:.0f} |")


def profile_method(model: Any, fixed: dict[str, torch.Tensor], name: str, config: relcache.CacheConfig) -> None:
    """One primed generation, then one with each cached call from step 6 on profiled; print the table."""
    walls, ops, full = profile_calls(model, fixed, config, lambda i, full: i not in full and 6 <= i < STEPS - 1)
    print_table(f"{name}: full steps {sorted(full)}; cached calls", walls, ops)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
    model = build(CPU, "cpu", torch.float32)
    fixed = inputs(model, IMAGE, TEXT, "cpu", torch.float32)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; FLUX-like 2+4 blocks, {IMAGE}+{TEXT} tokens, {STEPS} steps, float32")
    for name, config in {"TaylorSeer 3.5x": TaylorSeer(4, 2), "RFC 3.5x": RFC(order=2, target_nfc=8)}.items():
        profile_method(model, fixed, name, config)


if __name__ == "__main__":
    main()
