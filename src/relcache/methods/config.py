"""A caching method is a pair: a predictor (what a cached step returns) times a schedule (when a step is full).

The presets name the pairs of the literature:

==================  ====================  ======================
preset              predictor             schedule
==================  ====================  ======================
FORA                Reuse                 Interval
TaylorSeer          Taylor(m)             Interval
RFC                 Relational(m)         InputError (RCS)
RFE alone (abl.)    Relational(m)         Interval
RCS alone (abl.)    Taylor(m)             InputError
FasterCache         Linear(w), attention  Interval (+ CFG-Cache)
==================  ====================  ======================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .predictors import Predictor, Relational, Reuse, Taylor
from .schedules import InputError, Interval, Schedule

#: kinds of cached module an adapter can report
MODULE_KINDS = ("attn", "cross_attn", "mlp")


@dataclass(frozen=True)
class CacheConfig:
    """One caching method: ``predictor`` x ``schedule``.

    ``modules`` restricts caching to some kinds of module (``"attn"``, ``"cross_attn"``, ``"mlp"``; None = all).
    ``cache_dtype`` stores cached tensors in lower precision (e.g. ``torch.bfloat16``) to save memory.
    ``name`` is only a label for tables and stats.
    """

    predictor: Predictor
    schedule: Schedule
    modules: tuple[str, ...] | None = None
    cache_dtype: torch.dtype | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.predictor, Predictor):
            raise ConfigError(
                "predictor must be one of relcache.Reuse(), Taylor(order), Relational(order), Linear(weight); "
                f"got {self.predictor!r}"
            )
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(
                f"schedule must be relcache.Interval(...) or relcache.InputError(...); got {self.schedule!r}"
            )
        if self.modules is not None:
            bad = [m for m in self.modules if m not in MODULE_KINDS]
            if bad or not self.modules:
                raise ConfigError(f"modules must be a non-empty subset of {MODULE_KINDS}, got {self.modules!r}")
        if self.cache_dtype is not None and not (
            isinstance(self.cache_dtype, torch.dtype) and self.cache_dtype.is_floating_point
        ):
            raise ConfigError(f"cache_dtype must be a floating torch.dtype or None, got {self.cache_dtype!r}")

    @property
    def label(self) -> str:
        """A short human-readable name."""
        if self.name:
            return self.name
        return f"{type(self.predictor).__name__} x {type(self.schedule).__name__}"


def FORA(interval: int = 4, warmup: int = 2) -> CacheConfig:  # noqa: N802 (public preset names)
    """FORA: reuse the last full step's outputs, one full step every ``interval``."""
    return CacheConfig(Reuse(), Interval(interval, warmup), name=f"FORA(N={interval})")


def TaylorSeer(interval: int = 4, order: int = 2, warmup: int = 2) -> CacheConfig:  # noqa: N802
    """TaylorSeer: Taylor forecasting of order ``order``, one full step every ``interval``."""
    return CacheConfig(Taylor(order), Interval(interval, warmup), name=f"TaylorSeer(N={interval}, m={order})")


def RFC(  # noqa: N802
    order: int = 2,
    threshold: float | None = None,
    target_nfc: int | None = None,
    warmup: int = 2,
    max_skip: int | None = None,
) -> CacheConfig:
    """Relational Feature Caching: relational forecasting (RFE) with the input-error schedule (RCS).

    Give exactly one of ``threshold`` (the paper's hand-tuned ``tau``) and ``target_nfc`` (a budget of full
    computations per generation, found automatically).
    """
    schedule = InputError(threshold=threshold, target_nfc=target_nfc, order=order, warmup=warmup, max_skip=max_skip)
    budget = f"NFC={target_nfc}" if target_nfc is not None else f"tau={threshold}"
    return CacheConfig(Relational(order), schedule, name=f"RFC({budget}, m={order})")
