"""What relcache's end of a transformer call costs the host, with the cache peak summed at every call or not.

At the end of every call relcache noted the peak of its cache memory by summing the bytes of every predictor state:
at DiT-XL/2's depth 56 states or more, each a few tensors. A cached step records nothing, so since 2026-12-05 the sum
is skipped there (``Context.note_peak``). This script times ``Session.end_call`` on every call of eager 50-step
generations of a DiT with XL/2's 28 blocks and a tiny width (``host_bound.build``, one CPU thread), the two ways
interleaved, generation by generation: "summed every call" forces the sum as before (``note_peak(deferred=True)``),
"relcache" is the shipped rule. The outputs of the two are compared (the rule changes no number). Medians over calls
of each kind (full, cached), then the median over generations.

    python benchmarks/end_call.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from host_bound import build
from speed import machine_line

import relcache
from relcache.runtime.calls import StepCalls
from relcache.runtime.context import Context

STEPS = 50
METHODS = {"FORA": lambda: relcache.FORA(4), "TaylorSeer m=2": lambda: relcache.TaylorSeer(4, 2),
           "RFC m=2": lambda: relcache.RFC(order=2, target_nfc=14)}


def generation(model: torch.nn.Module, always: bool) -> tuple[dict[str, list[float]], torch.Tensor]:
    """One generation's ``end_call`` times in µs per kind of step (full or cached), and its last output."""
    times: list[float] = []
    end_call, note_peak = StepCalls.end_call, Context.note_peak

    def timed(self: Any) -> None:
        start = time.perf_counter()
        end_call(self)
        times.append((time.perf_counter() - start) * 1e6)

    StepCalls.end_call = timed
    if always:
        Context.note_peak = lambda self, deferred=False: note_peak(self, True)
    try:
        relcache.begin_generation(model, STEPS)
        x, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
        with torch.no_grad():
            for i in range(STEPS):
                out = model(x, timestep=torch.tensor([999 - 20 * i] * 2), class_labels=labels, return_dict=False)[0]
                x = x - 0.02 * out[:, :4]  # the noise half (out_channels 8: learned sigma)
    finally:
        StepCalls.end_call, Context.note_peak = end_call, note_peak
    full = set(relcache.stats(model).contexts["default"].full_steps)
    kinds: dict[str, list[float]] = {"full": [], "cached": []}
    for step, t in enumerate(times):
        kinds["full" if step in full else "cached"].append(t)
    return kinds, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    print(f"{machine_line(1)}; DiT at XL/2 depth (28 blocks), hidden 16, batch 2, eager, {STEPS}-step generations, "
          f"medians of {args.repeats}")
    print("| method | step | calls | summed every call, µs | relcache, µs | saved, µs | outputs equal |")
    print("|---|---|---|---|---|---|---|")
    for name, make in METHODS.items():
        model = build()
        relcache.enable(model, make())
        generation(model, True)  # warm-up
        per: dict[bool, dict[str, list[float]]] = {True: {"full": [], "cached": []}, False: {"full": [], "cached": []}}
        outs: dict[bool, torch.Tensor] = {}
        calls: dict[str, int] = {}
        for _ in range(args.repeats):
            for always in (True, False):
                kinds, outs[always] = generation(model, always)
                for kind, ts in kinds.items():
                    per[always][kind].append(statistics.median(ts))
                    calls[kind] = len(ts)
        relcache.disable(model)
        equal = bool(torch.equal(outs[True], outs[False]))
        for kind in ("full", "cached"):
            a, b = statistics.median(per[True][kind]), statistics.median(per[False][kind])
            print(f"| {name} | {kind} | {calls[kind]} | {a:.1f} | {b:.1f} | {a - b:.1f} | {equal} |")


if __name__ == "__main__":
    main()
