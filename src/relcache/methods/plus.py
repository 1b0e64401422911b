"""Beyond the paper (issue 19): pieces that extend RFC where it is weakest, at low budgets.

* ``NewtonHistory``: divided differences in Newton's form, ``D_j(a) = (D_{j-1}(a) - D_{j-1}(b)) / (t_a - t_{a-j})``,
  and the forecast ``X(a+k) = D_0 + k (D_1 + (k + G_1)(D_2 + (k + G_2)(D_3 + ...)))`` with ``G_j = t_a - t_{a-j}``:
  exact on polynomials of its order for any gaps between full steps (RCS makes them uneven). The spec's Taylor
  form (``DiffHistory``) divides every order by the latest gap and weights by ``k^j / j!``, which is exact only
  at order 1.
* ``Newton``: TaylorSeer's predictor with the Newton-form forecast.
* ``RelationalPlus``: RFE with the Newton-form direction and, optionally, a forecast of the ratio ``s`` from its
  own history instead of its latest value (``ratio="trend"``: its first difference, extrapolated from the middle
  of the interval it was measured over to the middle of the forecast interval).
* ``NewtonInputError``: RCS whose probe forecast is in Newton's form.

The preset ``relcache.RFCPlus`` names the pair kept after measuring (docs/spec.md, §Beyond the paper;
docs/results.md, "RFC+"): better than RFC on the shipped reference model (0.80-0.85x its rel L1); on the second one
0.83-1.00x on rel L1 but worse on FID2FC at low budgets, so an opt-in experiment. ``InputFit`` (the output's move
fitted from the input's, ``methods/fit.py``) is ``RFCPlus(fit=True)``'s predictor: with full steps calibrated for the
model (``relcache calibrate``) it is the pair that meets issue 19's bar on both reference models (docs/results.md).
The paper's RFC (``Relational`` x ``InputError``) is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .history import DiffHistory, Reducer, StaticCaches, finite, row_dtype
from .predictors import Relational, Taylor
from .schedules import InputError, InputErrorState
from .state import PredictorState
from .storage import CacheStorage, held_bytes

#: how ``RelationalPlus`` forecasts the ratio ``s``
RATIO_MODES = ("latest", "trend", "mean")


class NewtonHistory(DiffHistory):
    """Newton divided differences ``D_0 .. D_m`` of one tensor sequence, taken at full steps (uneven gaps allowed).

    Same interface as ``DiffHistory`` (``update(value, gap)``, ``base``, ``direction(row)``, ``taylor(row)``);
    ``gaps`` keeps the latest ``m`` gaps (0-d tensors, newest first) that the spans ``G_j`` are sums of.
    """

    __slots__ = ("gaps",)

    def __init__(self, max_order: int, dtype: torch.dtype | CacheStorage | None = None) -> None:
        super().__init__(max_order, dtype)
        self.gaps: list[torch.Tensor] = []

    def update(self, value: torch.Tensor, gap: torch.Tensor | None, change: torch.Tensor | None = None) -> None:
        """Record ``value`` observed at a full step ``gap`` steps after the previous record (None: the first);
        ``change`` as ``DiffHistory.update``'s (``D_1`` is the same first divided difference in both forms)."""
        new = [value]
        if gap is not None and self.diffs and self.diffs[0].shape == value.shape:
            gaps = [gap, *self.gaps][: self.max_order]
            span = gap
            for j in range(1, self.max_order + 1):
                if j - 1 >= len(self.diffs):
                    break
                if j > 1:
                    span = span + gaps[j - 1]  # t_a - t_{a-j}
                if j == 1 and change is not None:
                    new.append(change.div_(span))
                else:
                    new.append((new[j - 1] - self.get(j - 1, value.dtype)) / span)
            self.gap, self.gaps = gap, gaps
        else:  # first record, or the shape changed: start over
            self.gap, self.gaps = None, []
        self._keep(new, value, offload=False)  # (as before: the Newton form is held in place even when offloading)

    def multipliers(self, row: torch.Tensor) -> list[torch.Tensor]:
        """The Horner multipliers of the Newton increment ``k · u``, ``u = D_1 + (k + G_1)(D_2 + (k + G_2)(D_3 + ...))``
        (``direction``, ``k = row[0]``, ``G_j`` the sum of the ``j`` latest gaps), ``j = 1 .. m-1``."""
        k = row[0]
        return [k + sum(self.gaps[1:j], self.gaps[0]) for j in range(1, len(self.diffs) - 1)]

    def hold_extra(self, static: StaticCaches, key: object, gap_like: torch.Tensor, reserve: bool) -> None:
        """The gaps into their own buffers: the newest is the step rows' view, which the next step overwrites in place.
        Each record shifts the list by one (buffer ``j + 1`` takes buffer ``j``'s value), so the oldest goes first."""
        if reserve:
            for j in range(self.max_order):
                static.reserve((key, "gaps", j), gap_like.new_zeros(()))
        held: list[torch.Tensor] = list(self.gaps)
        for j in reversed(range(len(held))):
            held[j] = static.put((key, "gaps", j), held[j])
        self.gaps = held


def _newton_state(order: int, dtype: torch.dtype | CacheStorage | None, reducer: Reducer | None) -> PredictorState:
    state = PlusState(order, dtype, reducer)
    state.out = NewtonHistory(order, dtype)
    return state


class PlusState(PredictorState):
    """``PredictorState`` plus the previous ratio ``s(b)`` and the two gaps the ratios were measured over."""

    __slots__ = ("ratio_prev", "ratio_gaps", "ratio_line")

    def __init__(self, order: int, dtype: torch.dtype | CacheStorage | None, reducer: Reducer | None = None) -> None:
        super().__init__(order, dtype, reducer)
        self.ratio_prev: torch.Tensor | None = None  # s(b), per sample
        self.ratio_gaps: tuple[torch.Tensor, torch.Tensor] | None = None  # (a - b, b - c)
        # ``ŝ = A + B · k`` clipped to ``[lo, hi]``, folded at the record that set ``s(a)`` (``RelationalPlus``):
        # (A, B or None for a constant, lo, hi), per sample; None where the ratio arrives later (a split sequence)
        self.ratio_line: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """``PredictorState.nbytes`` plus ``s(b)`` and the folded line, per sample (the 0-d gaps are not counted,
        as a history's gap is not)."""
        return super().nbytes + sum(held_bytes(t) for t in (self.ratio_prev, *(self.ratio_line or ())))

    def hold_extra(self, static: StaticCaches, key: object, value: torch.Tensor, gap_like: torch.Tensor) -> None:
        """``s(b)``, its two gaps and the folded line into their own buffers, before ``hold_state`` puts the ratio and
        the gap: ``s(b)`` is the ratio's buffer and ``N_b`` the gap's until then. Reserved outside compiled code."""
        if not torch.compiler.is_compiling():
            like = value.new_zeros(value.shape[0], dtype=row_dtype(value.dtype))
            static.reserve((key, "ratio_prev"), like)
            for j in range(4):
                static.reserve((key, "ratio_line", j), like)
            for j in range(2):
                static.reserve((key, "ratio_gaps", j), gap_like.new_zeros(()))
        if self.ratio_prev is not None:
            self.ratio_prev = static.put((key, "ratio_prev"), self.ratio_prev)
        if self.ratio_gaps is not None:
            self.ratio_gaps = tuple(static.put((key, "ratio_gaps", j), g) for j, g in enumerate(self.ratio_gaps))
        if self.ratio_line is not None:
            self.ratio_line = tuple(None if t is None else static.put((key, "ratio_line", j), t)
                                    for j, t in enumerate(self.ratio_line))


@dataclass(frozen=True)
class Newton(Taylor):
    """TaylorSeer's predictor with the Newton-form forecast (``NewtonHistory``): exact on polynomials of degree
    ``order`` whatever the gaps between full steps."""

    def new_state(self, dtype: torch.dtype | CacheStorage | None = None, reducer: Reducer | None = None,
                  ) -> PredictorState:
        return _newton_state(self.order, dtype, reducer)


@dataclass(frozen=True)
class RelationalPlus(Relational):
    """RFE with a Newton-form direction (``newton``) and a forecast ratio (``ratio``).

    ``Ô(i) = O(a) + ŝ · ‖I(i) - I(a)‖ · u / ‖u‖``, ``u`` the Newton (or, with ``newton=False``, Taylor) direction.
    ``ratio``: ``"latest"`` (RFE: ``ŝ = s(a)``), ``"mean"`` (``(s(a) + s(b)) / 2``) or ``"trend"``
    (``ŝ = s(a) + (s(a) - s(b)) · (N_a + k) / (N_a + N_b)``: ``s(a)`` belongs to the middle of ``[b, a]``, ``s(b)`` to
    that of ``[c, b]``, and the forecast to that of ``[a, i]``), with ``ŝ`` clipped to ``[s(a) / clip, s(a) · clip]``.
    (choice) Where ``s(b)`` is missing or ``ŝ`` is not finite, ``ŝ = s(a)``; the rest of RFE's fallbacks are as in
    ``Relational``.
    """

    order: int = 2
    newton: bool = True
    ratio: str = "trend"
    clip: float = 2.0
    uses_input: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.newton, bool):
            raise ConfigError(f"newton must be True or False, got {self.newton!r}")
        if self.ratio not in RATIO_MODES:
            raise ConfigError(f"ratio must be one of {', '.join(map(repr, RATIO_MODES))}, got {self.ratio!r}")
        if not (isinstance(self.clip, (int, float)) and not isinstance(self.clip, bool) and self.clip >= 1):
            raise ConfigError(f"clip must be a number >= 1, got {self.clip!r}")

    def new_state(self, dtype: torch.dtype | CacheStorage | None = None, reducer: Reducer | None = None,
                  ) -> PredictorState:
        if self.newton:
            return _newton_state(self.order, dtype, reducer)
        return PlusState(self.order, dtype, reducer)

    def state_bytes(self, out_shape: tuple[int, ...], in_shape: tuple[int, ...], computed: torch.dtype,
                    storage: CacheStorage | None, input_shared: bool = False) -> int:
        """``Relational.state_bytes`` plus ``s(b)`` and the folded line's per-sample numbers (``PlusState.nbytes``)."""
        per_sample = {"latest": 1, "mean": 4, "trend": 5}[self.ratio]  # s(b); and A, (B,) lo, hi
        ratio = 8 if computed == torch.float64 else 4
        return (super().state_bytes(out_shape, in_shape, computed, storage, input_shared)
                + per_sample * ratio * (out_shape[0] if out_shape else 1))

    def record(self, state: PredictorState, inp: torch.Tensor, out: torch.Tensor, gap: torch.Tensor | None) -> None:
        prev, prev_gap = state.ratio, state.out.gap
        super().record(state, inp, out, gap)
        if isinstance(state, PlusState):
            ok = prev is not None and gap is not None and prev_gap is not None and state.out.gap is not None
            state.ratio_prev = prev if ok else None
            state.ratio_gaps = (gap, prev_gap) if ok else None
            state.ratio_line = self._fold(state)

    def _fold(self, state: PlusState) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """``forecast_ratio``'s numbers that do not depend on ``k``, taken once per full step: the trend is the line
        ``A + B · k`` with ``B = (s(a) - s(b)) / (N_a + N_b)`` and ``A = s(a) + B · N_a`` (a sample whose ``A`` or ``B``
        is not finite gets ``A = s(a)``, ``B = 0``: the fallback), and the clip's bounds. A cached step then forecasts
        ``ŝ`` in two small operators instead of about fourteen. None where there is nothing to fold."""
        s, prev = state.ratio, state.ratio_prev
        if s is None or prev is None or self.ratio == "latest":
            return None
        lo, hi = s / self.clip, s * self.clip
        if self.ratio == "mean":
            est = 0.5 * (s + prev)
            return torch.where(finite(est), est, s), None, lo, hi
        n_a, n_b = state.ratio_gaps
        slope = (s - prev) / (n_a + n_b).to(s.dtype)
        start = s + slope * n_a.to(s.dtype)
        ok = torch.isfinite(start) & torch.isfinite(slope)
        return torch.where(ok, start, s), torch.where(ok, slope, 0.0), lo, hi

    def forecast_ratio(self, state: PredictorState, row: torch.Tensor) -> torch.Tensor | None:
        """``ŝ`` per sample for the step whose row is ``row`` (None while ``s(a)`` is unknown): the line ``_fold``
        took at the full step, or, where the ratio arrived after the record (a split sequence's deferred collective),
        the same line taken now."""
        line = state.ratio_line
        if line is None and state.ratio is not None:
            line = self._fold(state)
        if line is None:
            return state.ratio
        start, slope, lo, hi = line
        est = start if slope is None else torch.addcmul(start, slope, row[0].to(start.dtype))
        return torch.clamp(est, lo, hi)

    def ratio_at(self, state: PredictorState, row: torch.Tensor) -> torch.Tensor | None:
        return self.forecast_ratio(state, row)


@dataclass(frozen=True)
class NewtonInputError(InputError):
    """RCS (``InputError``, same arguments and budget rules) whose probe forecast is in Newton's form."""

    def new_state(self, num_steps: int | None, reducer: Reducer | None = None) -> InputErrorState:
        state = super().new_state(num_steps, reducer)
        state.history = NewtonHistory(self.order)
        return state

    def release(self, state: InputErrorState) -> None:
        state.history = NewtonHistory(self.order)


def newton_forecast(values: Sequence[torch.Tensor], times: Sequence[float], t: float, order: int) -> torch.Tensor:
    """The Newton-form forecast at time ``t`` from ``values`` observed at increasing ``times`` (for tests and
    analyses): ``NewtonHistory`` fed in order."""
    hist = NewtonHistory(order)
    for j, (v, ti) in enumerate(zip(values, times, strict=True)):
        hist.update(v, None if j == 0 else torch.tensor(float(ti - times[j - 1])))
    k = float(t - times[-1])
    return hist.taylor(torch.tensor([k]), values[-1].dtype)
