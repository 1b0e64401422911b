"""The four predictors: what a cached step returns for one cached module.

Each predictor is a small frozen config acting on a per-module state: ``new_state`` (empty), ``record`` (at a full
step, with the module's actual input and output and the gap since the previous record) and ``forecast`` (at a cached
step, with the module's actual input and the step's row of numbers, ``history.step_row``). Steps enter only as data
(0-d tensors and rows), so the same code runs eagerly and compiled; an eager caller may also pass the row's ``k`` as a
host number, which lets a forecast launch fewer kernels (never under compile, where it would be a constant).
``update`` and ``predict`` are the same by step number, for analyses and tests. Formulas: ``docs/spec.md``,
§Predictors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..errors import ConfigError, check_float, check_int
from . import fused
from .history import (
    MAX_ORDER,
    ROW_WEIGHT,
    DiffHistory,
    Reducer,
    finite,
    numbers_on,
    per_sample,
    power_sums,
    roots,
    row_dtype,
    sample_norm,
    step_row,
)
from .state import PredictorState
from .storage import CacheStorage, stored_bytes


def no_infinite_size(size: torch.Tensor) -> torch.Tensor:
    """``‖u‖`` with an infinite norm read as 0: a direction holding an infinite element (a float16 overflow recorded)
    gives no relational magnitude, so ``c = s · ‖ΔI‖ / ‖u‖`` is not finite and falls back to Taylor's ``k``; it was
    0, a forecast of ``O(a)`` with NaN where ``u`` was infinite (found by review, 2026-12-07). NaN stays NaN."""
    return torch.nan_to_num(size, nan=float("nan"), posinf=0.0)


class Forecast(NamedTuple):
    """One output to forecast (``Predictor.forecast_many``): its state, the module's input, the step's row on the
    device and, for an eager call, the row's ``k`` on the host (None: read it from the row)."""

    state: PredictorState
    inp: torch.Tensor
    row: torch.Tensor
    k: float | None = None


def _as_forecast(item: Forecast | tuple) -> Forecast:
    return item if isinstance(item, Forecast) else Forecast(*item)


class Predictor(ABC):
    """What a cached step returns for a module, from what its full steps recorded."""

    #: how many divided differences the state keeps
    order: int = 0
    #: whether ``update``/``predict`` use the module's input
    uses_input: bool = False
    #: whether ``forecast`` accepts the row's ``k`` as a host number (``k=``); predictors written without it still work
    takes_host_k: ClassVar[bool] = False
    #: whether the predictor keeps its caches only as computed (``CacheConfig`` then refuses a ``cache_dtype``)
    computed_only: ClassVar[bool] = False

    def regional_graphs(self) -> int | None:
        """About how many graphs one block class holding modules cached by this predictor compiles under regional
        compilation (``compile_repeated_blocks``) in the first two generations, one per kind of step and history
        length: what ``torch._dynamo.config.recompile_limit`` must allow. Measured on a FLUX-like pipeline
        (``benchmarks/regional_compile.py --pipeline --orders 1 2 3 4``, 2026-12-07); None where unmeasured."""
        return None

    def new_state(self, dtype: torch.dtype | CacheStorage | None = None, reducer: Reducer | None = None,
                  ) -> PredictorState:
        """An empty per-module state; ``dtype`` optionally stores the cache in lower precision (a dtype for every
        tensor, or a ``CacheStorage``); ``reducer`` sums norms over the slices of a sequence split across processes
        (context parallelism)."""
        return PredictorState(self.order, dtype, reducer)

    def state_bytes(self, out_shape: tuple[int, ...], in_shape: tuple[int, ...], computed: torch.dtype,
                    storage: CacheStorage | None, input_shared: bool = False) -> int:
        """Bytes a state holds once its history is full (``order`` differences, and RFE's input and ratios), for an
        output of ``out_shape`` and an input of ``in_shape`` computed in ``computed``: what a budget is checked on,
        before any module runs. Equal to ``PredictorState.nbytes`` after enough full steps of an eager run; compiled
        records may keep more (``compiled_bytes``).
        ``input_shared``: the input is a tensor another state stores (its bytes are that state's)."""
        st = storage or CacheStorage()
        total = stored_bytes(out_shape, st.base, st.scale, computed)
        total += self.order * stored_bytes(out_shape, st.diffs, st.scale, computed)
        if self.uses_input:
            ratio = 8 if computed == torch.float64 else 4  # per-sample norms, ``sample_norm``'s precision
            total += ratio * (out_shape[0] if out_shape else 1)
            total += 0 if input_shared else stored_bytes(in_shape, st.input, st.scale, computed)
        return total

    def compiled_bytes(self, out_shape: tuple[int, ...], computed: torch.dtype) -> int:
        """Bytes a state holds besides ``state_bytes`` when its records run compiled (RFE's Gram); 0 here."""
        return 0

    def row(self, k: int, step: int, num_steps: int | None) -> list[float]:
        """The numbers a forecast at step ``step``, ``k`` steps after the latest full step, needs (``step_row``)."""
        return step_row(k)

    def record(self, state: PredictorState, inp: torch.Tensor, out: torch.Tensor, gap: torch.Tensor | None) -> None:
        """Record the output (and input, where used) of a full step ``gap`` steps after the previous record."""
        state.out.update(out, gap)

    @abstractmethod
    def forecast(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """The output at a cached step given the module's actual input ``inp`` and the step's ``row``. A predictor
        with ``takes_host_k`` also accepts ``k``: the row's first number on the host, where an eager caller has it
        (the same result, fewer kernels)."""

    def forecast_many(self, items: Sequence[Forecast | tuple]) -> list[torch.Tensor]:
        """``forecast`` of each item (a ``Forecast`` or a ``(state, input, row)`` tuple): every output of one module
        call, in order."""
        return [self._forecast_item(_as_forecast(item)) for item in items]

    def _forecast_item(self, it: Forecast) -> torch.Tensor:
        if self.takes_host_k and it.k is not None:
            return self.forecast(it.state, it.inp, it.row, k=it.k)  # type: ignore[call-arg]
        return self.forecast(it.state, it.inp, it.row)

    def update(self, state: PredictorState, step: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        """``record`` by step number: the output (and input) of full step ``step``."""
        gap = None if state.step is None else numbers_on(float(step - state.step), out.device, row_dtype(out.dtype))
        self.record(state, inp, out, gap)
        state.step = step

    def predict(self, state: PredictorState, step: int, num_steps: int | None, inp: torch.Tensor) -> torch.Tensor:
        """``forecast`` by step number: the output at cached step ``step`` of ``num_steps``."""
        host = self.row(step - state.step, step, num_steps)
        return self._forecast_item(Forecast(state, inp, numbers_on(host, inp.device, row_dtype(inp.dtype)), host[0]))


def _check_order(order: int) -> int:
    return check_int("order", order, 0, MAX_ORDER)


@dataclass(frozen=True)
class Reuse(Predictor):
    """FORA: ``Ô(i) = O(a)``, the output of the latest full step."""

    def forecast(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return state.out.base(inp.dtype)

    def regional_graphs(self) -> int | None:
        return 4


@dataclass(frozen=True)
class Taylor(Predictor):
    """TaylorSeer of order m: ``Ô(a+k) = sum_j D_j k^j / j!`` from backward divided differences."""

    order: int = 2

    def __post_init__(self) -> None:
        _check_order(self.order)

    def forecast(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return state.out.taylor(row, inp.dtype)

    def regional_graphs(self) -> int | None:
        return 3 + 2 * self.order


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
    takes_host_k: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_order(self.order)
        if self.order == 0:
            raise ConfigError("order must be an integer in 1..4 for Relational (it needs a direction), got 0")

    def regional_graphs(self) -> int | None:
        return 4 + 3 * self.order

    def compiled_bytes(self, out_shape: tuple[int, ...], computed: torch.dtype) -> int:
        """The Gram a compiled record keeps: ``order²`` numbers per sample, in ``sample_norm``'s precision."""
        return self.order ** 2 * (out_shape[0] if out_shape else 1) * (8 if computed == torch.float64 else 4)

    def record(self, state: PredictorState, inp: torch.Tensor, out: torch.Tensor, gap: torch.Tensor | None) -> None:
        self._record(state, inp, out, gap)
        # Compiled: the Gram of the differences, fused with the record, so that a compiled forecast's ``‖u‖`` reads no
        # difference (``_finish``); eager forecasts take the norm of ``u`` (the Gram's kernels would cost a launch-bound
        # GPU more than the pass they save). None after an eager record, whose forecasts then take the norm too.
        split = state.reducer is not None
        state.gram = state.out.gram(out.dtype) if torch.compiler.is_compiling() and not split else None

    def _record(self, state: PredictorState, inp: torch.Tensor, out: torch.Tensor, gap: torch.Tensor | None) -> None:
        prev_in = state.inp
        if prev_in is not None and state.ready and prev_in.shape == inp.shape and state.reducer is not None:
            # split sequence: the partial sums join the next collective (the next step's decision), no one of theirs
            parts = torch.stack([power_sums(out - state.out.base(out.dtype)), power_sums(inp - state.input(inp.dtype))])
            state.ratio = None
            state.reducer.later(parts, lambda sums: setattr(state, "ratio", roots(sums[0]) / roots(sums[1])))
        elif prev_in is not None and state.ready and prev_in.shape == inp.shape:
            change = out - state.out.base(out.dtype)
            num = sample_norm(change)
            den = state.input_moved(inp)
            state.ratio = num / den  # inf/nan where den == 0: handled as a fallback in predict
            if gap is not None and change.shape == out.shape and not torch.is_grad_enabled():
                state.out.update(out, gap, change)  # D_1 = change / N, in place: one pass over the output less
                state.store_input(inp)
                return
        else:
            state.ratio = None
        state.out.update(out, gap)
        state.store_input(inp)

    def forecast(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor, k: float | None = None,
                 ) -> torch.Tensor:
        if state.reducer is not None:
            return self.forecast_many([Forecast(state, inp, row, k)])[0]
        hist = state.out
        if k is not None and fused.enabled() and state.inp is not None and len(hist.diffs) > 1:
            got = self._fused(state, inp, row, k)
            if got is not None:
                return got
        if (state.ratio is not None and state.inp is not None and len(hist.diffs) > 2
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            # Eager: the input change is needed only for its norm, so the direction is written over it afterwards
            # (one fresh full-size tensor per forecast instead of two; on a CPU each page-faults). Same numbers.
            moved = state.shared_moved(inp)
            change = None
            if moved is None:
                change = inp - state.input(inp.dtype)
                moved = sample_norm(change)
                state.keep_moved(inp, moved)
            base = hist.base(inp.dtype)
            fits = change is not None and change.shape == base.shape and change.dtype == base.dtype
            u = hist.direction(row, inp.dtype, out=change if fits else None)
            return self._finish(state, inp, row, u, None, moved, base, k)
        return self._finish(state, inp, row, hist.direction(row, inp.dtype), None, k=k)

    def _fused(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor, k: float) -> torch.Tensor | None:
        """The forecast in two kernels (``fused.py``) where they apply, else None: an eager call with ``k`` on the
        host, plain stored tensors and the plain divided differences (a subclass's own form takes the torch path),
        recorded eagerly (a compiled record's Gram gives ``‖u‖`` otherwise)."""
        hist = state.out
        if (type(hist) is not DiffHistory or state.gram is not None or not 2 <= len(hist.diffs) <= 5
                or row.dtype != torch.float32 or row.device != inp.device or row.stride() != (1,) or row.numel() < 4
                or not fused.applies(inp, state.inp, hist.diffs)):
            return None
        s = self.ratio_at(state, row)
        if (s is None or type(s) is not torch.Tensor or s.dtype != torch.float32 or not s.is_contiguous()
                or s.device != inp.device or s.shape != inp.shape[:1]):
            return None
        return fused.forecast(inp, state.inp, hist.diffs, row, s, k)

    def forecast_many(self, items: Sequence[Forecast | tuple]) -> list[torch.Tensor]:
        """With a reducer (split sequence), the norms of every item, i.e. of one module call's outputs and row
        groups, go into one collective; without one, ``forecast`` of each."""
        items = [_as_forecast(item) for item in items]
        reducer = items[0].state.reducer if items else None
        if reducer is None:
            return super().forecast_many(items)
        us = [it.state.out.direction(it.row, it.inp.dtype) for it in items]
        # the input change and the direction of every item that has both (the others need no norm)
        used = [j for j, it in enumerate(items) if us[j] is not None and it.state.inp is not None]
        parts = [torch.stack([power_sums(it.inp - it.state.input(it.inp.dtype)), power_sums(us[j])])
                 for j, it in ((j, items[j]) for j in used)]
        norms: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(items)
        if parts:  # one collective; it also settles ratios deferred from the latest full step
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
            sums = reducer.sum(torch.cat([p.to(dtype).reshape(-1) for p in parts]))
            for j, p, got in zip(used, parts, sums.split([p.numel() for p in parts]), strict=True):
                moved, size = roots(got.reshape(p.shape).to(p.dtype)).unbind(0)
                norms[j] = (moved, size)
        return [self._finish(it.state, it.inp, it.row, u, n, k=it.k) for it, u, n in zip(items, us, norms, strict=True)]

    def ratio_at(self, state: PredictorState, row: torch.Tensor) -> torch.Tensor | None:
        """The ratio ``s`` a forecast with ``row`` uses: the latest full step's (a subclass may forecast it)."""
        return state.ratio

    def _finish(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor, u: torch.Tensor | None,
                norms: tuple[torch.Tensor, torch.Tensor] | None, moved: torch.Tensor | None = None,
                base: torch.Tensor | None = None, k: float | None = None) -> torch.Tensor:
        """The forecast from the direction ``u`` (the increment is ``d = k · u``, so ``d / ‖d‖ = u / ‖u‖``) and, on a
        split sequence, the whole sequence's norms of the input change and of ``u``; ``moved``, the input change's
        norm and ``base`` (``O(a)``) where the caller read them already (an offloaded cache is copied back once);
        ``k``, the row's ``k`` on the host (eager callers)."""
        hist = state.out
        base = hist.base(inp.dtype) if base is None else base
        s = self.ratio_at(state, row)
        if u is None or s is None:
            return base if u is None else torch.addcmul(base, row[0], u)
        if norms is not None:
            coef = s * norms[0] / no_infinite_size(norms[1])
        else:
            if moved is None:
                moved = state.input_moved(inp)
            gram = state.gram
            fits = gram is not None and gram.shape[-1] == hist.order and gram.shape[0] == u.shape[0]
            size = hist.direction_norm(gram, row) if fits else sample_norm(u)
            if u.dtype == torch.float16 or torch.compiler.is_compiling():  # (eagerly one kernel: float16 alone
                size = no_infinite_size(size)  # overflows its differences; compiled it fuses)
            coef = s * moved / size
        # Fallback folded into the coefficient: k gives the Taylor forecast base + k · u. No host sync.
        # With k on the host, one kernel (``coef`` is never negative: -inf cannot occur, but is mapped too). Without
        # it (compiled code, or a step captured by hand), ``finite`` and a ``where``.
        if k is None:
            coef = torch.where(finite(coef), coef, row[0])
        else:
            coef = torch.nan_to_num(coef, nan=k, posinf=k, neginf=k)
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
    early to about 1 late), or a callable ``(step, num_steps) -> float`` (``num_steps`` None where the generation's
    length is unknown), whose every result must be a finite number.
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

    def regional_graphs(self) -> int | None:
        return 5

    def weight_at(self, step: int, num_steps: int | None) -> float:
        """``w(i)`` for step ``step`` of ``num_steps``."""
        w = self.weight
        if w == "rising":
            return rising_weight(step, num_steps)
        if callable(w):  # checked at every call: a NaN or infinite weight would turn every cached output into NaN
            got = w(step, num_steps)
            if hasattr(got, "item") and not isinstance(got, (bool, int, float)):  # a one-element tensor or array
                try:
                    got = got.item()
                except (ValueError, RuntimeError):  # more than one element: refused below
                    pass
            return check_float(f"Linear's weight, called at step {step} of {num_steps},", got,
                               allowed="a callable returning a finite number")
        return float(w)

    def row(self, k: int, step: int, num_steps: int | None) -> list[float]:
        return step_row(k, self.weight_at(step, num_steps))

    def forecast(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        hist = state.out
        base = hist.base(inp.dtype)
        if hist.order < 1:
            return base
        delta = hist.get(1, inp.dtype) * hist.gap  # O(a) - O(b)
        w = row[ROW_WEIGHT]
        # the weight times the difference in the row's precision (as a Python scalar would be), then rounded
        return base + (delta.to(torch.promote_types(delta.dtype, w.dtype)) * w).to(delta.dtype)
