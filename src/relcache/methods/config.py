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

CFG-Cache (``relcache.CFGCache``) is its own piece: set ``cfg_cache`` on any config to also skip the
unconditional half of classifier-free guidance, e.g.
``dataclasses.replace(relcache.RFC(target_nfc=14), cfg_cache=relcache.CFGCache(skip_full=True))`` (beside a method
that caches modules, the default ``CFGCache()`` skips nothing: ``skip_full=None`` resolves to False there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, as_int, check_int
from .cfg_cache import PHASES as CFG_PHASES
from .cfg_cache import CFGCache, check_window
from .predictors import MAX_ORDER, Linear, Predictor, Relational, Reuse, Taylor, WeightFn
from .schedules import InputError, Interval, Schedule, Steps
from .storage import CacheStorage, check_format

#: kinds of cached module an adapter can report
MODULE_KINDS = ("attn", "cross_attn", "mlp")


@dataclass(frozen=True)
class CacheConfig:
    """One caching method: ``predictor`` x ``schedule``.

    ``modules`` restricts caching to some kinds of module (``"attn"``, ``"cross_attn"``, ``"mlp"``; None = all).
    ``cache_dtype`` stores cached tensors in lower precision to save memory: one format for every cached tensor
    (``torch.bfloat16``; ``torch.float16`` or ``torch.float8_e4m3fn``, stored with a power-of-two scale per token
    so that nothing overflows; ``"int8"`` or ``"int4"``), or a ``relcache.CacheStorage`` giving outputs,
    differences and RFE's input each their own format and the scale's granularity.
    ``max_cache_bytes`` instead lets relcache pick the storage: at the first call of each generation, before any
    module runs, the bytes each storage of ``STORAGE_LADDER`` would hold are computed from the modules' shapes, and
    the first (most precise) that fits is used; a ``ConfigError`` says so when even the last does not fit.
    ``name`` is only a label for tables and stats (``label`` appends CFG-Cache when set).
    ``cfg_cache`` also skips the unconditional half of classifier-free guidance (``relcache.CFGCache``); it
    combines with any predictor x schedule and is inert when the model is not run with CFG.
    """

    predictor: Predictor
    schedule: Schedule
    modules: tuple[str, ...] | None = None
    cache_dtype: torch.dtype | str | CacheStorage | None = None
    name: str | None = None
    cfg_cache: CFGCache | None = None
    max_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.predictor, Predictor):
            raise ConfigError(
                "predictor must be one of relcache.Reuse(), Taylor(order), Relational(order), Linear(weight); "
                f"got {self.predictor!r}"
            )
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(
                "schedule must be relcache.Interval(...), relcache.InputError(...) or relcache.Steps(...); "
                f"got {self.schedule!r}"
            )
        if self.modules is not None:
            # a tuple or list of kinds, stored as a tuple in MODULE_KINDS order (hashable; equal configs compare equal)
            given = self.modules
            if not isinstance(given, (tuple, list)) or not given or any(m not in MODULE_KINDS for m in given):
                raise ConfigError(
                    f"modules must be a non-empty subset of {MODULE_KINDS} as a tuple or list, e.g. ('attn',), "
                    f"or None (all); got {given!r}"
                )
            object.__setattr__(self, "modules", tuple(k for k in MODULE_KINDS if k in given))
        if not isinstance(self.cache_dtype, CacheStorage):
            check_format("cache_dtype", self.cache_dtype, or_storage=True)
        if self.cache_dtype is not None and getattr(self.predictor, "computed_only", False):
            raise ConfigError(f"{type(self.predictor).__name__} keeps its caches as computed: give no cache_dtype, got "
                              f"{self.cache_dtype!r}")
        if self.max_cache_bytes is not None:
            n = as_int(self.max_cache_bytes)
            if n is None or n < 1:  # 0 fits no method: every one keeps a cache
                raise ConfigError(
                    f"max_cache_bytes must be an integer >= 1 (bytes) or None, got {self.max_cache_bytes!r}")
            if self.cache_dtype is not None:
                raise ConfigError("give cache_dtype or max_cache_bytes, not both: max_cache_bytes picks the storage; "
                                  f"got cache_dtype={self.cache_dtype!r}")
            object.__setattr__(self, "max_cache_bytes", n)
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError(f"name must be a str (a label for tables and stats) or None, got {self.name!r}")
        if self.cfg_cache is not None and not isinstance(self.cfg_cache, CFGCache):
            raise ConfigError(f"cfg_cache must be a relcache.CFGCache(...) or None, got {self.cfg_cache!r}")
        if self.cfg_cache is not None and self.cfg_cache.refresh_full and self.schedule.uses_input:
            raise ConfigError("cfg_cache=CFGCache(refresh_full=True) needs a schedule that reads no input "
                              f"(relcache.Interval): it forces full steps the schedule did not choose; got "
                              f"{type(self.schedule).__name__}")

    @property
    def storage(self) -> CacheStorage | None:
        """``cache_dtype`` as a ``CacheStorage`` (None: as computed)."""
        return CacheStorage.of(self.cache_dtype)

    @property
    def label(self) -> str:
        """A short human-readable name."""
        base = self.name or f"{type(self.predictor).__name__} x {type(self.schedule).__name__}"
        return base if self.cfg_cache is None else f"{base} + CFG-Cache(n={self.cfg_cache.interval})"


#: the storages ``max_cache_bytes`` chooses from, most precise first and fewest bytes last (docs/spec.md, §Cache
#: storage; their quality cost on the reference model: docs/performance.md, "Cache memory")
STORAGE_LADDER: tuple[CacheStorage | None, ...] = (
    None,
    CacheStorage(torch.bfloat16, torch.bfloat16, torch.bfloat16),
    CacheStorage(torch.bfloat16, torch.float8_e4m3fn, torch.bfloat16),
    CacheStorage(torch.bfloat16, "int4", torch.bfloat16),
    CacheStorage(torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e4m3fn),
    # int8 base and input rather than float8's: the same bytes, measured closer to full computation (+6.2 % rel L1
    # against +18.5 % on the reference model at NFC 14, docs/performance.md)
    CacheStorage("int8", "int4", "int8"),
)


def FORA(interval: int = 4, warmup: int = 2) -> CacheConfig:  # noqa: N802 (public preset names)
    """FORA: reuse the last full step's outputs, one full step every ``interval``."""
    schedule = Interval(interval, warmup)
    return CacheConfig(Reuse(), schedule, name=f"FORA(N={schedule.interval})")


def TaylorSeer(interval: int = 4, order: int = 2, warmup: int = 2) -> CacheConfig:  # noqa: N802
    """TaylorSeer: Taylor forecasting of order ``order``, one full step every ``interval``."""
    schedule, order = Interval(interval, warmup), check_int("order", order, 0, MAX_ORDER)
    return CacheConfig(Taylor(order), schedule, name=f"TaylorSeer(N={schedule.interval}, m={order})")


def RFC(  # noqa: N802
    order: int = 2,
    threshold: float | None = None,
    target_nfc: int | None = None,
    warmup: int = 2,
    max_skip: int | None = None,
) -> CacheConfig:
    """Relational Feature Caching: relational forecasting (RFE) with the input-error schedule (RCS).

    Give exactly one of ``threshold`` (the paper's hand-tuned ``tau``) and ``target_nfc`` (a budget of full
    computations per generation, found automatically). ``max_skip`` forces a full step after that many cached steps
    in a row; with ``target_nfc`` only while the budget has a full step left to give (docs/spec.md, "RCS",
    rule 4).
    """
    # checked here for RFC's own range: Relational needs a direction, so order 0 (allowed in InputError) is not RFC
    order = check_int("order", order, 1, MAX_ORDER)
    schedule = InputError(threshold=threshold, target_nfc=target_nfc, order=order, warmup=warmup, max_skip=max_skip)
    budget = f"NFC={schedule.target_nfc}" if target_nfc is not None else f"tau={schedule.threshold:g}"
    return CacheConfig(Relational(order), schedule, name=f"RFC({budget}, m={order})")


def FasterCache(  # noqa: N802
    interval: int = 2,
    warmup: int = 15,
    weight: float | str | WeightFn = "rising",
    alpha1: float = 0.1,
    alpha2: float = 0.1,
    cfg_interval: int = 5,
    cfg_window: tuple[float, float] = (0.34, 1.0),
    early: float = 0.9,
    late: float = 0.7,
    cfg: bool = True,
    cfg_align: bool = False,
    cfg_phase: str = "step0",
    cfg_refresh_full: bool | None = None,
    compound: bool = False,
) -> CacheConfig:
    """FasterCache: dynamic feature reuse of the attention modules plus CFG-Cache.

    Attention outputs are forecast by ``Linear(weight)`` (``O(a) + w(i) · (O(a) - O(b))``, ``w`` rising from 0 to
    1 by default, the paper's schedule; diffusers defaults to a constant 0.5) with ``Interval(interval, warmup)``;
    feed-forwards and cross-attention always run. Every self-attention the adapter lists is cached, temporal ones
    included (diffusers leaves temporal attention uncached unless asked). ``cfg=False`` leaves out CFG-Cache
    (guidance-distilled models).

    Defaults are diffusers' FasterCache schedule (``FasterCacheConfig``, diffusers 0.42) as it falls on a 50-step
    DDIM sampler (timesteps 980 ... 0), step for step: ``spatial_attention_block_skip_range=2`` -> ``interval=2``;
    ``spatial_attention_timestep_skip_range=(-1, 681)`` (attention computed while ``t >= 681``) -> ``warmup=15``
    (use about ``0.3 · num_steps`` for other step counts); CFG-Cache: ``unconditional_batch_skip_range=5`` ->
    ``cfg_interval=5`` with its refresh steps counted from step 0 (``cfg_phase="step0"``), ``(-1, 641)`` ->
    ``cfg_window=(0.34, 1.0)``, and attention computed at every step that runs both halves
    (``cfg_refresh_full=True``: an attention skip needs the half batch); alphas ``1.1`` -> ``alpha1 = alpha2 = 0.1``,
    low-frequency range ``(99, 901)`` -> ``early=0.9``, high-frequency range ``(-1, 301)`` -> ``late=0.7``. See
    ``CFGCache``. (choice) The schedule is diffusers', the formulas the paper's (the rising weight): on the reference
    model model FLOPs 0.676 and rel L1 0.0052 against diffusers' own FasterCache's 0.677 and 0.0095; the schedule
    read from the paper before (``warmup=16, cfg_window=(0.36, 1.0), cfg_phase="window", cfg_refresh_full=False``)
    gave 0.666 and 0.0237 (docs/results.md).
    ``cfg_align`` is ``CFGCache.align``, False here (choice): aligned (skip the unconditional half only at full
    attention steps) the feed-forwards of the unconditional half run at every cached attention step, worse on both
    counts on the reference model (docs/results.md). ``cfg_phase``, ``cfg_refresh_full`` and ``compound`` are
    ``CFGCache.phase``, ``refresh_full`` and ``compound``; ``cfg_refresh_full`` is True unless ``cfg_align`` (None:
    the one that fits), and True with ``cfg_align=True`` is an error.
    """
    predictor, schedule = Linear(weight), Interval(interval, warmup)
    if not isinstance(cfg, bool):
        raise ConfigError(f"cfg must be True (with CFG-Cache) or False (without), got {cfg!r}")
    if not isinstance(cfg_align, bool):
        raise ConfigError(f"cfg_align must be True (skip only at full steps) or False (the paper's schedule), "
                          f"got {cfg_align!r}")
    if not (isinstance(cfg_phase, str) and cfg_phase in CFG_PHASES):
        raise ConfigError(f"cfg_phase must be one of {', '.join(map(repr, CFG_PHASES))}, got {cfg_phase!r}")
    if cfg_refresh_full is None:
        cfg_refresh_full = not cfg_align
    for name, value in (("cfg_refresh_full", cfg_refresh_full), ("compound", compound)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    if cfg_refresh_full and cfg_align:
        raise ConfigError("cfg_refresh_full=True needs cfg_align=False (aligned, every step would be full)")
    # checked whether or not CFG-Cache is on, under this preset's names (CFGCache calls them interval and window)
    cfg_cache = CFGCache(interval=check_int("cfg_interval", cfg_interval, 1),
                         window=check_window("cfg_window", cfg_window),
                         alpha1=alpha1, alpha2=alpha2, early=early, late=late, align=cfg_align,
                         phase=cfg_phase, refresh_full=cfg_refresh_full, compound=compound,
                         # aligned, skip at full attention steps: FasterCache's saving is its CFG-Cache
                         skip_full=True if cfg_align else None)
    return CacheConfig(
        predictor, schedule, modules=("attn",), cfg_cache=cfg_cache if cfg else None,
        name=f"FasterCache(N={schedule.interval})",
    )


def RFCPlus(  # noqa: N802
    order: int = 2,
    threshold: float | None = None,
    target_nfc: int | None = None,
    warmup: int = 2,
    max_skip: int | None = None,
    full_steps: Sequence[int] | Steps | None = None,
    fit: bool = False,
) -> CacheConfig:
    """RFC+ (ours, issue 19; not the paper's): RFC's schedule (RCS, unchanged) with ``RelationalPlus(order)``, RFE whose
    direction is the Newton-form forecast (exact on polynomials for RCS's uneven gaps) and whose ratio ``s`` is
    forecast from its trend (``relcache.methods.plus``; measured in docs/results.md, "RFC+").

    Same arguments and budget rules as ``RFC``: give exactly one of ``threshold`` and ``target_nfc``; or, instead of
    RCS, ``full_steps``: full steps fixed in advance (``Steps``), calibrated for the model, sampler and budget with
    ``relcache calibrate`` (``warmup`` and ``max_skip`` do not apply to them). ``fit=True``: the input-fitted increment
    (``InputFit(order, scale=True)``: the output moves as the input did, in the span of its recent moves) instead of
    ``RelationalPlus``; with calibrated steps the pair that meets issue 19's bar on both reference models
    (docs/results.md). (choice) It keeps its caches as computed and does not run under context parallelism.
    """
    from .fit import InputFit
    from .plus import RelationalPlus

    order = check_int("order", order, 1, MAX_ORDER)
    if not isinstance(fit, bool):
        raise ConfigError(f"fit must be True or False, got {fit!r}")
    predictor = InputFit(order, scale=True) if fit else RelationalPlus(order)
    tag = f"m={order}, fit" if fit else f"m={order}"
    if full_steps is not None:
        if threshold is not None or target_nfc is not None or max_skip is not None or warmup != 2:
            raise ConfigError("full_steps fixes the schedule: give neither threshold, target_nfc, max_skip nor warmup "
                              f"with it, got threshold={threshold!r}, target_nfc={target_nfc!r}, "
                              f"max_skip={max_skip!r}, warmup={warmup!r}")
        try:
            steps = full_steps if isinstance(full_steps, Steps) else Steps(full_steps)
        except ConfigError as err:  # Steps names its own field: here the argument is full_steps
            raise ConfigError(str(err).replace("steps must", "full_steps must", 1)) from None
        return CacheConfig(predictor, steps, name=f"RFC+(steps={list(steps.steps)}, {tag})")
    schedule = InputError(threshold=threshold, target_nfc=target_nfc, order=order, warmup=warmup, max_skip=max_skip)
    budget = f"NFC={schedule.target_nfc}" if target_nfc is not None else f"tau={schedule.threshold:g}"
    return CacheConfig(predictor, schedule, name=f"RFC+({budget}, {tag})")
