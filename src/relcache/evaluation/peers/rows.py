"""The peers' bench rows: each budget (NFC of 50 DDIM steps, as in ``bench.default_methods``) turned into every
peer's settings.

TaylorSeer gets the interval and warm-up that give exactly that NFC under diffusers' schedule; the
threshold-based peers (First-Block Cache, MagCache, DBCache) get thresholds calibrated on the shipped reference
model (``REFERENCE_THRESHOLDS``; redo with ``python -m relcache.evaluation.peers``, see ``calibrate.py``).
Realized NFC and FLOPs are measured by the bench anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bench import DEFAULT_BUDGETS, INTERVAL_FOR_NFC, BenchMethod, Sampler
from .cache_dit import CacheDiTPeer, cache_dit_unavailable
from .diffusers import DiffusersFasterCache, DiffusersMagCache, diffusers_first_block_cache, diffusers_taylorseer

__all__ = ["CALIBRATED_FOR", "MAG_MAX_SKIP", "REFERENCE_THRESHOLDS", "TAYLORSEER_SCHEDULE", "calibration_differences",
           "peer_methods", "thresholds_unfit"]

#: budget (NFC of 50 steps) -> (cache_interval, disable_cache_before_step) of diffusers' TaylorSeer. Its
#: schedule computes steps 0..w-1, predicts step w, then computes w+1, w+1+N, ...: NFC = w + (48-w)//N + 1.
#: Warm-up 2 (relcache's) where it gives the budget exactly, else warm-up 1.
TAYLORSEER_SCHEDULE = {14: (4, 2), 11: (5, 1), 10: (6, 2), 8: (7, 1), 7: (9, 1)}

#: budget -> MagCache's max_skip_steps (K): one more than the steps FORA skips at that budget, so the threshold
#: (not the cap) decides.
MAG_MAX_SKIP = dict(INTERVAL_FOR_NFC)

#: Thresholds for the threshold-based peers on the shipped reference model (trained 1580 steps), DDIM 50 steps,
#: CFG 1.5, one batch of 10 (classes 0..9, seed 0): per budget, the smallest threshold whose realized NFC equals
#: it, found by bisection with ``python -m relcache.evaluation.peers`` (``calibrate_thresholds``; ~4 min on
#: 1 CPU thread). Every one hit its budget exactly on that batch. Budget -> threshold.
REFERENCE_THRESHOLDS: dict[str, dict[int, float]] = {
    "fbcache": {14: 0.0584, 11: 0.0786, 10: 0.0949, 8: 0.118, 7: 0.131},
    "magcache": {14: 0.0899, 11: 0.142, 10: 0.181, 8: 0.346, 7: 0.376},
    "cache_dit": {14: 0.0616, 11: 0.0949, 10: 0.1, 8: 0.131, 7: 0.154},
}

#: the settings ``REFERENCE_THRESHOLDS`` were calibrated for, on the shipped reference model
CALIBRATED_FOR = {"num_steps": 50, "guidance_scale": 1.5, "batch_size": 10}


def calibration_differences(*, reference_model: bool = True, num_steps: int = 50, guidance_scale: float | None = 1.5,
                            batch_size: int = 10) -> list[str]:
    """How a bench's model and settings differ from what ``REFERENCE_THRESHOLDS`` were calibrated for."""
    differ = [] if reference_model else ["another model"]
    return differ + [f"{value} steps" if name == "num_steps" else f"{name.replace('_', ' ')} {value}"
                     for name, value in (("num_steps", num_steps), ("guidance_scale", guidance_scale),
                                         ("batch_size", batch_size)) if value != CALIBRATED_FOR[name]]


def thresholds_unfit(*, reference_model: bool = True, num_steps: int = 50, guidance_scale: float | None = 1.5,
                     batch_size: int = 10) -> str | None:
    """Why ``REFERENCE_THRESHOLDS`` do not apply to a bench with these settings (None: they do).

    A threshold only means an NFC for the model and settings it was calibrated on: the residual differences it is
    compared with are another model's, scale with the guidance, and are means over the batch. Found by review: on a
    user's DiT (``--model``) the rows labelled "NFC~14" realized NFC 50 (FBCache) and 16 (MagCache)."""
    differ = calibration_differences(reference_model=reference_model, num_steps=num_steps,
                                     guidance_scale=guidance_scale, batch_size=batch_size)
    if not differ:
        return None
    return ("not run: its threshold was calibrated on the shipped reference model (50 steps, guidance 1.5, batches "
            f"of 10), not for {', '.join(differ)}; calibrate one with relcache.evaluation.peers.calibrate_thresholds")


def peer_methods(budgets: Sequence[int] = DEFAULT_BUDGETS, *, num_steps: int = 50, guidance_scale: float | None = 1.5,
                 sampler: Sampler | None = None, batch_size: int = 10, reference_model: bool = True
                 ) -> list[BenchMethod]:
    """Bench rows of the peers at each budget (NFC of 50 steps), plus FasterCache once (it has no budget).

    ``num_steps``/``guidance_scale``/``sampler``/``batch_size`` are the bench's (MagCache indexes its ratios by step
    and calibrates them with ``sampler``, default ``sample_digits``); ``reference_model``: whether it runs on the
    shipped reference model. Where ``REFERENCE_THRESHOLDS`` do not apply (``thresholds_unfit``) the threshold-based
    peers' rows are unavailable, the reason their note; TaylorSeer (a fixed schedule) and FasterCache (its defaults)
    still run.
    """
    unfit = thresholds_unfit(reference_model=reference_model, num_steps=num_steps, guidance_scale=guidance_scale,
                             batch_size=batch_size)
    no_cache_dit = cache_dit_unavailable()
    rows = []
    for nfc in budgets:
        if nfc not in INTERVAL_FOR_NFC:
            raise ValueError(f"budgets must be among {sorted(INTERVAL_FOR_NFC)} (NFC of 50 steps), got {nfc}")
        interval, warmup = TAYLORSEER_SCHEDULE[nfc]
        fbc = REFERENCE_THRESHOLDS["fbcache"][nfc]
        mag = REFERENCE_THRESHOLDS["magcache"][nfc]
        dbc = REFERENCE_THRESHOLDS["cache_dit"][nfc]
        label = f"diffusers TaylorSeer N={interval} w={warmup} m=2"
        rows.append(BenchMethod(label, peer=diffusers_taylorseer(label, interval, warmup, order=2), budget=nfc))
        if unfit is not None:  # no threshold is used: none in the labels
            rows += [BenchMethod(f"{name} NFC~{nfc}", unavailable=unfit, budget=nfc) for name in
                     ("diffusers FBCache", f"diffusers MagCache K={MAG_MAX_SKIP[nfc]}", "cache-dit DBCache F1B0+TS1")]
            continue
        label = f"diffusers FBCache NFC~{nfc} t={fbc:g}"
        rows.append(BenchMethod(label, peer=diffusers_first_block_cache(label, fbc), budget=nfc))
        label = f"diffusers MagCache NFC~{nfc} t={mag:g} K={MAG_MAX_SKIP[nfc]}"
        rows.append(BenchMethod(label, peer=DiffusersMagCache(
            label, mag, MAG_MAX_SKIP[nfc], num_steps=num_steps, sampler=sampler, guidance_scale=guidance_scale,
        ), budget=nfc))
        label = f"cache-dit DBCache F1B0+TS1 NFC~{nfc} t={dbc:g}"
        if no_cache_dit is None:
            rows.append(BenchMethod(label, peer=CacheDiTPeer(label, dbc), budget=nfc))
        else:
            rows.append(BenchMethod(label, unavailable=no_cache_dit, budget=nfc))
    rows.append(BenchMethod("diffusers FasterCache (defaults)", peer=DiffusersFasterCache()))
    return rows
