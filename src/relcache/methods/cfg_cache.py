"""CFG-Cache (FasterCache): skip the unconditional half of classifier-free guidance and rebuild it.

Classifier-free guidance computes ``ε_c`` (conditional) and ``ε_u`` (unconditional) every step. The two differ
less than one step differs from the next, and their difference moves from low to high frequencies as sampling
proceeds. At a step where both halves run, the difference is stored split into a low and a high frequency band;
at a step where the unconditional half is skipped it is rebuilt from the conditional output::

    ε̂_u = IFFT( LF(ε_c) + w1 · ΔLF + HF(ε_c) + w2 · ΔHF ).real,  ΔLF = LF(ε_u) - LF(ε_c),  ΔHF = HF(ε_u) - HF(ε_c)

This module is the method only (band split, rebuild, skip schedule, validation); ``relcache.runtime`` slices the
batch and keeps the stored deltas. Specification: ``docs/spec.md``, §CFG-Cache.

Defaults follow diffusers' ``FasterCacheConfig`` (diffusers 0.42, ``hooks/faster_cache.py``), whose ranges are in
timesteps of a 1000-step training schedule; with evenly spaced timesteps, timestep ``t`` is about step fraction
``1 - t / 1000``:

* ``unconditional_batch_skip_range=5``                    -> ``interval=5``
* ``unconditional_batch_timestep_skip_range=(-1, 641)``   -> ``window=(0.36, 1.0)`` (``FasterCache`` uses 0.34:
  where ``t < 641`` falls on a 50-step DDIM sampler, step 17)
* ``alpha_low_frequency = alpha_high_frequency = 1.1``    -> ``alpha1 = alpha2 = 0.1`` (``w = 1 + alpha``)
* ``low_frequency_weight_update_timestep_range=(99, 901)``  -> ``early=0.9`` (LF boosted while ``i < 0.9 T``)
* ``high_frequency_weight_update_timestep_range=(-1, 301)`` -> ``late=0.7`` (HF boosted once ``i >= 0.7 T``)
* band radius ``min(H, W) // 5`` (the official scripts' and diffusers' ``_split_low_high_freq``)

The window makes diffusers' lower LF bound (``t < 901``) moot with the default window; it is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, as_int, check_float, check_int

#: the default band radius is ``min(H, W) // RADIUS_DIVISOR``
RADIUS_DIVISOR = 5
#: where the refresh steps are counted from: the window's first step, or step 0 (diffusers)
PHASES = ("window", "step0")


def _check_fraction(name: str, value: object) -> float:
    return check_float(name, value, allowed="a fraction of the steps in [0, 1]", low=0, high=1)


def _check_alpha(name: str, value: object) -> float:
    return check_float(name, value, allowed="a finite number >= 0 (0.1 to 0.15 is typical)", low=0)


def check_window(name: str, value: object) -> tuple[float, float]:
    """``value`` as a ``(start, end)`` pair of step fractions with ``0 <= start <= end <= 1``."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ConfigError(f"{name} must be a pair (start, end) of step fractions in [0, 1], got {value!r}")
    start, end = (_check_fraction(name, v) for v in value)
    if start > end:
        raise ConfigError(f"{name} must be (start, end) with 0 <= start <= end <= 1, got {value!r}")
    return start, end


def _check_window_steps(value: object) -> tuple[int, int]:
    pair = [as_int(v) for v in value] if isinstance(value, (tuple, list)) and len(value) == 2 else [None]
    if None in pair or pair[0] < 0 or pair[0] > pair[1]:
        raise ConfigError(
            f"window_steps must be (start, end) step indices with 0 <= start <= end <= num_steps, got {value!r}"
        )
    return pair[0], pair[1]


@dataclass(frozen=True)
class CFGCache:
    """Skip the unconditional CFG half at most steps inside a window and rebuild it from the conditional half.

    Schedule: inside the window the refresh steps are the window's first step and every ``interval`` steps after
    it; outside the window both halves always run. (choice) The count starts at the window's first step
    (``phase="window"``, the default), so the window always opens with a fresh delta. ``phase="step0"`` counts from
    step 0, as diffusers does: the refresh steps are the window's steps ``i`` with ``i % interval == 0``, and the
    window's first steps before one rebuild from the delta of the step before the window (which runs both halves
    and stores it).

    ``refresh_full`` (choice, default False; the ``FasterCache`` preset sets it): every step at which a CFG batch
    runs both halves is a full step of the module schedule (the schedule's own full steps stay full). So a stored
    delta is never taken from module forecasts, and the module caches are forecast only at steps that run the
    conditional half alone, as in diffusers' FasterCache. Only with ``align=False`` and a schedule that reads no
    input (``Interval``); a forced full step costs the cached modules' FLOPs of both halves.

    ``align`` (choice, default True): the unconditional half is skipped only at full steps of the module schedule
    (where ``skip_full`` allows it, below), and a delta is stored only at a full step. Each refresh step moves to the
    first full step at or after it (refresh steps that land on one full step count once): that step runs both halves
    and stores the delta; any other full step in the window runs the conditional half alone and rebuilds the
    unconditional one; a cached step runs both halves, forecast by the module caches as without CFG-Cache. Until the
    first delta is stored the window's steps run both halves. So the unconditional half's module caches are recorded
    at every refresh, and every stored delta is a true one. A schedule that decides inside the forward (RCS) is asked
    at the call's start, from a pre-pass of the forward up to its first cached module, wherever the answer matters.
    ``skip_full`` (ignored unless ``align``): whether a full step of the module schedule may skip the unconditional
    half. ``skip_full=False`` runs both halves at every full step too: CFG-Cache then skips nothing, and the
    combination is the method alone, sample for sample. ``align=False`` is the paper's schedule: the unconditional
    half runs at the refresh steps themselves, full or cached, and is skipped at every other step of the window.

    With a module cache, a skip at a full step saves half a full step's module FLOPs, but the cached steps after it
    forecast the unconditional half from the refresh before. On the reference model (docs/results.md) that costs
    more error than the method's own budget would for the same saving at RFC NFC 14 and 11 and TaylorSeer N = 4
    with the default window; in the window's last fifth (``window=(0.8, 1.0)``) it costs nothing at RFC NFC 14 and
    TaylorSeer N = 4 but still some at RFC NFC 11 and 10. No skip at a full step measured there was cheaper than
    the method's own budget. Hence (choice) ``skip_full=None``, the default: ``True`` when the module schedule
    computes every step (CFG-Cache alone: the full steps are all there is to skip), ``False`` when it caches
    modules, so that RFC or TaylorSeer + CFG-Cache never lose to the method alone at the same compute. Give
    ``skip_full=True`` to skip at full steps anyway (a model with strong guidance may pay; not measured here).
    ``CacheConfig`` resolves ``None`` from its schedule.

    * ``window``: the window as step fractions ``(start, end)``: step ``i`` of ``T`` is inside when
      ``start · T <= i < end · T``. ``window_steps``: the same as step indices ``[start, end)`` (overrides
      ``window``; must lie inside ``0..T``, checked when ``T`` is known). An empty window never skips.
    * ``alpha1``: low-band boost, ``w1 = 1 + alpha1`` in the early phase ``i < early · T``, else 1.
      ``alpha2``: high-band boost, ``w2 = 1 + alpha2`` in the late phase ``i >= late · T``, else 1.
    * ``radius``: radius of the centred low-band disk, in frequency bins; None = ``min(H, W) // 5``.
    * ``compound``: (choice) False (default): the weights scale the stored deltas afresh at each skipped step.
      True reproduces the official scripts and diffusers, which multiply the deltas in place, so the weights
      compound over consecutive skipped steps (``w^k`` at the k-th skip after a full step).
    * ``cond_first``: whether a batched CFG call puts the conditional half first; None asks the model adapter
      (DiT: True; PixArt, Latte, CogVideoX: False).

    Without CFG it is inert: a batched call counts as CFG when its batch is even and the two halves of its
    ``hidden_states`` are equal (``relcache.runtime`` documents the rule); split calls when named "cond"/"uncond".

    The band split acts on the last two axes, which are ``(H, W)`` in every diffusers transformer output
    (``(B, C, H, W)``; video ``(B, C, F, H, W)`` for Latte and ``(B, F, C, H, W)`` for CogVideoX), so it is per
    image and per frame whatever the layout.
    """

    interval: int = 5
    window: tuple[float, float] = (0.36, 1.0)
    window_steps: tuple[int, int] | None = None
    alpha1: float = 0.1
    alpha2: float = 0.1
    early: float = 0.9
    late: float = 0.7
    radius: int | None = None
    compound: bool = False
    cond_first: bool | None = None
    align: bool = True
    phase: str = "window"
    refresh_full: bool = False
    skip_full: bool | None = None

    def __post_init__(self) -> None:
        checked = {
            "interval": check_int("interval", self.interval, 1),
            "window": check_window("window", self.window),
            "window_steps": None if self.window_steps is None else _check_window_steps(self.window_steps),
            "alpha1": _check_alpha("alpha1", self.alpha1),
            "alpha2": _check_alpha("alpha2", self.alpha2),
            "early": _check_fraction("early", self.early),
            "late": _check_fraction("late", self.late),
            "radius": None if self.radius is None else check_int("radius", self.radius, 1),
        }
        if not isinstance(self.compound, bool):
            raise ConfigError(f"compound must be True or False, got {self.compound!r}")
        if not isinstance(self.align, bool):
            raise ConfigError(f"align must be True (refresh at full steps) or False (at the refresh steps), "
                              f"got {self.align!r}")
        if not (isinstance(self.phase, str) and self.phase in PHASES):
            raise ConfigError(f"phase must be one of {', '.join(map(repr, PHASES))} (count the refresh steps from "
                              f"the window's start or from step 0), got {self.phase!r}")
        if not isinstance(self.refresh_full, bool):
            raise ConfigError(f"refresh_full must be True (steps that run both halves are full) or False, "
                              f"got {self.refresh_full!r}")
        if self.skip_full is not None and not isinstance(self.skip_full, bool):
            raise ConfigError(f"skip_full must be True (aligned: skip the unconditional half at full steps), False or "
                              f"None (True only when the module schedule computes every step), got {self.skip_full!r}")
        if self.refresh_full and self.align:
            raise ConfigError("refresh_full=True needs align=False: aligned, the cached steps run both halves, and "
                              "refresh_full would make every step full")
        if self.cond_first is not None and not isinstance(self.cond_first, bool):
            raise ConfigError(
                f"cond_first must be True, False or None (ask the model adapter), got {self.cond_first!r}"
            )
        for name, value in checked.items():  # pairs as tuples (hashable), numbers as int or float
            object.__setattr__(self, name, value)

    # -- schedule ---------------------------------------------------------------------------------
    def window_range(self, num_steps: int | None) -> range:
        """The steps inside the window of a ``num_steps`` generation; raises if it does not fit."""
        if num_steps is None:
            raise ConfigError(
                "CFGCache needs the number of steps: enable caching on the pipeline (not the bare transformer), "
                "or call relcache.begin_generation(model, num_steps) before the loop"
            )
        if self.window_steps is not None:
            start, end = self.window_steps
            if end > num_steps:
                raise ConfigError(
                    f"window_steps must lie inside 0..num_steps ({num_steps}), got {tuple(self.window_steps)}"
                )
            return range(start, end)
        eps = 1e-9  # fractions such as 0.36 * 50 must give 18, not 19
        start = math.ceil(self.window[0] * num_steps - eps)
        end = math.ceil(self.window[1] * num_steps - eps)
        return range(start, end)

    def is_refresh(self, step: int, num_steps: int | None) -> bool:
        """Whether step ``step`` is a refresh step: inside the window, ``interval`` apart counted from the window's
        start (``phase="window"``) or from step 0 (``"step0"``)."""
        window = self.window_range(num_steps)
        origin = window.start if self.phase == "window" else 0
        return step in window and (step - origin) % self.interval == 0

    def skips(self, step: int, num_steps: int | None) -> bool:
        """Whether step ``step`` is inside the window and not a refresh step (``align=False``: it skips the
        unconditional half, given a stored delta)."""
        return step in self.window_range(num_steps) and not self.is_refresh(step, num_steps)

    def stores(self, step: int, num_steps: int | None) -> bool:
        """Whether step ``step``, if it runs both halves, stores the delta: inside the window, or (``phase="step0"``)
        the step before it, whose delta the window's first steps rebuild from."""
        window = self.window_range(num_steps)
        return step in window or (self.phase == "step0" and step == window.start - 1)

    def refresh_due(self, step: int, last_refresh: int | None, num_steps: int | None) -> bool:
        """``align`` with ``skip_full``: whether step ``step`` is inside the window with a refresh step in
        ``(last_refresh, step]``
        (the latest delta stored at ``last_refresh``; None = none stored yet)."""
        window = self.window_range(num_steps)
        if step not in window:
            return False
        origin = window.start if self.phase == "window" else 0
        latest = origin + (step - origin) // self.interval * self.interval
        if latest < window.start:  # step0 phase, before the window's first refresh step: due if nothing stored
            return last_refresh is None
        return last_refresh is None or latest > last_refresh

    def skipped_steps(self, num_steps: int, full_steps: list[int] | None = None) -> list[int]:
        """The steps of a ``num_steps`` generation that skip the unconditional half (for planning and tests).

        ``align`` needs ``full_steps``, the module schedule's full steps (e.g. ``Interval.full_steps``); with
        ``skip_full=None`` they decide it too (True only when every step is full)."""
        if not self.align:
            return [i for i in range(num_steps) if self.skips(i, num_steps)]
        if full_steps is None:
            raise ValueError("with align=True the skipped steps depend on the module schedule: give full_steps")
        if not self.skips_full(len(set(full_steps)) >= num_steps):
            return []
        last, skipped = None, []
        for i in sorted(set(full_steps) & set(self.window_range(num_steps))):
            if last is not None and not self.refresh_due(i, last, num_steps):
                skipped.append(i)
            else:
                last = i
        return skipped

    def skips_full(self, every_step_full: bool) -> bool:
        """``skip_full`` resolved: whether an aligned CFG-Cache may skip at full steps, the module schedule computing
        every step (``every_step_full``) or not."""
        return every_step_full if self.skip_full is None else self.skip_full

    def weights(self, step: int, num_steps: int) -> tuple[float, float]:
        """``(w1, w2)`` at step ``step``: ``1 + alpha1`` in the early phase, ``1 + alpha2`` in the late phase."""
        w1 = 1.0 + self.alpha1 if step < self.early * num_steps else 1.0
        w2 = 1.0 + self.alpha2 if step >= self.late * num_steps else 1.0
        return w1, w2

    # -- band split and rebuild -------------------------------------------------------------------
    def low_mask(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Boolean ``(H, W)`` mask of the centred low-frequency disk (after ``fftshift``)."""
        radius = self.radius if self.radius is not None else min(height, width) // RADIUS_DIVISOR
        y = torch.arange(height, device=device).view(-1, 1) - height // 2
        x = torch.arange(width, device=device).view(1, -1) - width // 2
        return y * y + x * x <= radius * radius

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(LF, HF)``: the centred 2-D spectrum of ``x`` over its last two axes, split by the low-band disk.

        Computed in float32 (float64 stays float64); ``LF + HF`` is the whole spectrum.
        """
        if x.ndim < 2:
            raise ValueError(f"CFG-Cache needs outputs with two spatial axes last, got shape {tuple(x.shape)}")
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        mask = self.low_mask(x.shape[-2], x.shape[-1], x.device)
        zero = torch.zeros((), dtype=spec.dtype, device=spec.device)
        return torch.where(mask, spec, zero), torch.where(mask, zero, spec)

    def deltas(self, uncond: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ΔLF, ΔHF)`` between the unconditional and conditional outputs of one step."""
        lf_u, hf_u = self.split(uncond)
        lf_c, hf_c = self.split(cond)
        return lf_u - lf_c, hf_u - hf_c

    def rebuild(
        self, cond: torch.Tensor, delta_lf: torch.Tensor, delta_hf: torch.Tensor, w1: float | torch.Tensor,
        w2: float | torch.Tensor,
    ) -> torch.Tensor:
        """``ε̂_u = IFFT(LF(ε_c) + w1 · ΔLF + HF(ε_c) + w2 · ΔHF).real``, in ``cond``'s dtype."""
        lf_c, hf_c = self.split(cond)
        spec = lf_c + w1 * delta_lf + hf_c + w2 * delta_hf
        out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real
        return out.to(cond.dtype)
