"""How ``REFERENCE_THRESHOLDS`` were found: bisection of each threshold-based peer's threshold for the NFC it
realizes. ``python -m relcache.evaluation.peers`` reruns it on the shipped reference model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..bench import DEFAULT_BUDGETS, Peer, Sampler
from .cache_dit import CacheDiTPeer, cache_dit_unavailable
from .diffusers import DiffusersMagCache, diffusers_first_block_cache
from .rows import MAG_MAX_SKIP

__all__ = ["calibrate_thresholds", "main", "measure_nfc"]


def measure_nfc(model: nn.Module, peer: Peer, sampler: Sampler, *, num_steps: int = 50, guidance_scale: float = 1.5,
                batches: int = 1, batch_size: int = 10, num_classes: int = 10) -> float:
    """Mean realized NFC of ``peer`` over ``batches`` bench-like batches (seeds 0, 1, ...)."""
    labels = torch.arange(batch_size) % num_classes
    peer.attach(model)
    try:
        values = []
        for seed in range(batches):
            peer.before_generation(model)
            sampler(model, labels, num_steps=num_steps, guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed))
            values.append(peer.nfc(model))  # type: ignore[attr-defined]
    finally:
        peer.detach(model)
    return sum(values) / len(values)


def calibrate_thresholds(model: nn.Module, make_peer: Callable[[float], Peer], targets: Sequence[float],
                         sampler: Sampler, *, low: float = 3e-3, high: float = 3.0, tolerance: float = 0.05,
                         **kwargs: Any) -> dict[float, tuple[float, float]]:
    """target NFC -> (threshold, realized NFC): for each target, bisection (in log space, down to ``tolerance``
    relative width) for the threshold whose NFC is closest, sharing all measurements between targets.

    NFC falls as the threshold grows; thresholds are rounded to 3 significant digits. ``kwargs`` go to
    :func:`measure_nfc`.
    """
    tried: dict[float, float] = {}

    def nfc_at(t: float) -> float:
        t = float(f"{t:.3g}")
        if t not in tried:
            tried[t] = measure_nfc(model, make_peer(t), sampler, **kwargs)
        return tried[t]

    found = {}
    for target in targets:
        lo, hi = math.log(low), math.log(high)
        for t, n in tried.items():  # what earlier targets measured narrows the bracket
            if n > target:
                lo = max(lo, math.log(t))
            else:
                hi = min(hi, math.log(t))
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            if nfc_at(math.exp(mid)) > target:
                lo = mid
            else:
                hi = mid
        best = min(tried, key=lambda t: (abs(tried[t] - target), t))
        found[target] = (best, tried[best])
    return found


def main() -> None:
    """Print the thresholds of ``REFERENCE_THRESHOLDS`` for the shipped reference model (one thread: several
    minutes on a busy 2-core CPU)."""
    from ..reference import load_reference_transformer, sample_digits

    torch.set_num_threads(1)
    model = load_reference_transformer()
    budgets = list(DEFAULT_BUDGETS)
    found: dict[str, dict[int, float]] = {}

    def report(name: str, results: dict[float, tuple[float, float]]) -> None:
        for nfc, (threshold, realized) in results.items():
            found.setdefault(name, {})[int(nfc)] = threshold
            print(f"{name} NFC {nfc}: threshold {threshold:g} -> realized NFC {realized:.1f}", flush=True)

    report("fbcache", calibrate_thresholds(model, lambda t: diffusers_first_block_cache("FBCache", t), budgets,
                                           sample_digits))
    for nfc in budgets:  # MagCache's cap K depends on the budget: one search each
        report("magcache", calibrate_thresholds(model, lambda t, k=MAG_MAX_SKIP[nfc]: DiffusersMagCache(
            "MagCache", t, k), [nfc], sample_digits))
    if cache_dit_unavailable() is None:
        report("cache_dit", calibrate_thresholds(model, lambda t: CacheDiTPeer("DBCache", t), budgets, sample_digits))
    print(found)
