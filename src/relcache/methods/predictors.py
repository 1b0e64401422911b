"""The four predictors: what a cached step returns for one cached module.

Each predictor is a small frozen config with three methods acting on a per-module state:
``new_state`` (empty), ``update`` (at a full step, with the module's actual input and output) and
``predict`` (at a cached step, with the module's actual input). Formulas: ``docs/spec.md``, §Predictors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, check_float, check_int
from .history import DiffHistory, per_sample, sample_norm

MAX_ORDER = 4


class PredictorState:
    """Per-module memory of a predictor: divided differences of the output, plus what the predictor adds."""

    __slots__ = ("out", "inp", "ratio")

    def __init__(self, order: int, dtype: torch.dtype | None) -> None:
        self.out = DiffHistory(order, dtype)
        self.inp: torch.Tensor | None = None  # I(a), Relational only
        self.ratio: torch.Tensor | None = None  # s per sample, Relational only

    @property
    def ready(self) -> bool:
        """True once a full step was recorded, i.e. a prediction is possible."""
        return self.out.step is not None

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: the output's differences, and the input and ratio where kept."""
        extra = [t for t in (self.inp, self.ratio) if t is not None]
        return self.out.nbytes + sum(t.numel() * t.element_size() for t in extra)


class Predictor(ABC):
    """What a cached step returns for a module, from what its full steps recorded."""

    #: how many divided differences the state keeps
    order: int = 0
    #: whether ``update``/``predict`` use the module's input
    uses_input: bool = False

    def new_state(self, dtype: torch.dtype | None = None) -> PredictorState:
        """An empty per-module state; ``dtype`` optionally stores the cache in lower precision."""
        return PredictorState(self.order, dtype)

    def update(self, state: PredictorState, step: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Record the output (and input, where used) of full step ``step``."""
        state.out.update(step, out)

    @abstractmethod
    def predict(self, state: PredictorState, step: int, num_steps: int | None, inp: torch.Tensor) -> torch.Tensor:
        """The predicted output at cached step ``step`` given the module's actual input ``inp``."""


def _check_order(order: int) -> int:
    return check_int("order", order, 0, MAX_ORDER)


@dataclass(frozen=True)
class Reuse(Predictor):
    """FORA: ``Ô(i) = O(a)``, the output of the latest full step."""

    def predict(self, state: PredictorState, step: int, num_steps: int | None, inp: torch.Tensor) -> torch.Tensor:
        return state.out.base(inp.dtype)


@dataclass(frozen=True)
class Taylor(Predictor):
    """TaylorSeer of order m: ``Ô(a+k) = sum_j D_j k^j / j!`` from backward divided differences."""

    order: int = 2

    def __post_init__(self) -> None:
        _check_order(self.order)

    def predict(self, state: PredictorState, step: int, num_steps: int | None, inp: torch.Tensor) -> torch.Tensor:
        return state.out.taylor(step - state.out.step, inp.dtype)


@dataclass(frozen=True)
class Relational(Predictor):
    """RFE (the RFC paper): Taylor direction, magnitude from how far the module's input moved.

    ``Ô(i) = O(a) + s · ‖I(i) - I(a)‖ · d / ‖d‖`` with ``d`` the Taylor increment and
    ``s = ‖O(a) - O(b)‖ / ‖I(a) - I(b)‖`` computed at full step ``a``, all per sample.
    (choice) A sample whose ``‖d‖`` or ``‖I(a) - I(b)‖`` is zero, or where anything is non-finite, gets the
    Taylor prediction; before the second full step the prediction is reuse.
    """

    order: int = 2
    uses_input: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_order(self.order)
        if self.order == 0:
            raise ConfigError("order must be an integer in 1..4 for Relational (it needs a direction), got 0")

    def update(self, state: PredictorState, step: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        prev_in = state.inp
        if prev_in is not None and state.ready and prev_in.shape == inp.shape:
            num = sample_norm(out - state.out.base(out.dtype))
            den = sample_norm(inp - prev_in.to(inp.dtype))
            state.ratio = num / den  # inf/nan where den == 0: handled as a fallback in predict
        else:
            state.ratio = None
        state.out.update(step, out)
        state.inp = inp if state.out.dtype is None else inp.to(state.out.dtype)

    def predict(self, state: PredictorState, step: int, num_steps: int | None, inp: torch.Tensor) -> torch.Tensor:
        hist = state.out
        k = step - hist.step
        base = hist.base(inp.dtype)
        u = hist.direction(k, inp.dtype)  # the increment is d = k · u, so d / ‖d‖ = u / ‖u‖
        if u is None or state.ratio is None:
            return base if u is None else torch.add(base, u, alpha=k)
        coef = state.ratio * sample_norm(inp - state.inp.to(inp.dtype)) / sample_norm(u)
        # Fallback folded into the coefficient: k gives the Taylor forecast base + k · u. No host sync.
        coef = torch.nan_to_num(coef, nan=float(k), posinf=float(k), neginf=float(k))
        # One fused pass, written over the fresh direction: a second large allocation here made a cached step
        # several times slower on CPU, where freshly allocated large buffers page-fault.
        # Out of place where autograd records the product (it saves u; out= refuses arguments that need grad,
        # and the coefficient does once the input does) and at order 1, where u is the stored D_1 itself.
        if (torch.is_grad_enabled() and (u.requires_grad or coef.requires_grad or base.requires_grad)
                or hist.is_stored(u)):
            return torch.addcmul(base, per_sample(coef, u), u)
        return torch.addcmul(base, per_sample(coef, u), u, out=u)


WeightFn = Callable[[int, int | None], float]


def rising_weight(step: int, num_steps: int | None) -> float:
    """FasterCache's rising weight: 0 at the first step, 1 at the last (linear in the step index)."""
    if not num_steps or num_steps <= 1:
        return 0.5
    return min(max(step / (num_steps - 1), 0.0), 1.0)


@dataclass(frozen=True)
class Linear(Predictor):
    """FasterCache dynamic feature reuse: ``Ô(i) = O(a) + w(i) · (O(a) - O(b))``.

    ``weight`` is a constant (diffusers' default is 0.5) or ``"rising"`` (the paper's schedule, from about 0
    early to about 1 late), or a callable ``(step, num_steps) -> float``.
    """

    weight: float | str | WeightFn = "rising"
    order: ClassVar[int] = 1

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, str) and w == "rising" or callable(w):
            return
        # a constant: a finite real number (a NaN or infinite weight turns every cached output into NaN)
        allowed = "a finite number, 'rising' or a callable (step, num_steps) -> float"
        object.__setattr__(self, "weight", check_float("weight", w, allowed=allowed))

    def weight_at(self, step: int, num_steps: int | None) -> float:
        """``w(i)`` for step ``step`` of ``num_steps``."""
        w = self.weight
        if w == "rising":
            return rising_weight(step, num_steps)
        if callable(w):
            return float(w(step, num_steps))
        return float(w)

    def predict(self, state: PredictorState, step: int, num_steps: int | None, inp: torch.Tensor) -> torch.Tensor:
        hist = state.out
        base = hist.base(inp.dtype)
        if hist.order < 1:
            return base
        delta = hist.diffs[1].to(inp.dtype) * hist.gap  # O(a) - O(b)
        return base + self.weight_at(step, num_steps) * delta
