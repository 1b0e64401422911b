"""Schedules: when a step is computed fully.

A schedule decides once per step, when the first cached module of that step is reached and before any
expensive module has run, so a full step costs nothing extra. ``Interval`` ignores the input;
``InputError`` (RCS, the RFC paper) watches the error of a Taylor prediction of that first module's input.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ConfigError, check_float, check_int, warn
from .history import MAX_ORDER, DiffHistory, Reducer, numbers_on, row_dtype, sample_relative_l1, step_row

#: target-NFC mode: the longest gap between full steps, in multiples of the even gap the rest of the budget allows
GAP_CAP = 1.5
#: target-NFC mode: the shortest gap, as that even gap divided by this (None: no lower bound)
GAP_FLOOR: float | None = 1.5


class Schedule(ABC):
    """Decides, once per step, whether the step is full."""

    warmup: int
    #: whether ``decide`` needs the first cached module's input
    uses_input: ClassVar[bool] = False

    def new_state(self, num_steps: int | None, reducer: Reducer | None = None) -> object:
        """Fresh per-generation state; ``num_steps`` is None when the loop did not announce it. ``reducer`` sums what
        the schedule reduces over tokens across the slices of a split sequence (the runtime passes it only then)."""
        return None

    def check_num_steps(self, num_steps: int | None) -> None:
        """ConfigError where no generation of ``num_steps`` can be planned (``new_state`` calls it; so does
        ``begin_generation``, before the loop's first call). Any count, here."""
        return None

    @abstractmethod
    def decide(self, state: object, step: int, probe: torch.Tensor | None,
               measured: torch.Tensor | None = None) -> bool:
        """True when step ``step`` is full. ``probe`` is the first cached module's actual input; ``measured``, what
        ``measure`` returned for it (taken in compiled code), when given."""

    def skipped(self, state: object, step: int) -> None:
        """Step ``step`` of this context was answered without running it (a split "uncond" call that CFG-Cache
        rebuilt from the "cond" call): neither full nor cached. Nothing to do for a schedule without a budget."""
        return None

    @property
    def every_step_full(self) -> bool:
        """Whether every step is full whatever the input (nothing is ever cached): CFG-Cache alone."""
        return False

    def forecast_row(self, state: object, step: int) -> list[float] | None:
        """The host numbers ``measure`` needs at step ``step`` (a step row), or None when the decision needs no
        measurement of the probe (warm-up, nothing recorded yet). Only schedules that use the input measure."""
        return None

    def measure(self, state: object, probe: torch.Tensor, row: torch.Tensor) -> torch.Tensor | None:
        """What ``decide`` reads of ``probe``, as tensors only (no host read), so that compiled code can take it in
        the graph of the step's pre-pass (runtime/steps.py, ``Prober``); ``row`` is ``forecast_row`` on the device.
        None when the probe's shape gives nothing to measure."""
        return None

    def release(self, state: object) -> None:
        """Free the tensors ``state`` holds once its generation ended (its numbers stay readable for the stats).
        Schedules that hold no tensor keep nothing to free."""
        return None


def _warn_if_warmup_covers(warmup: int, num_steps: int | None) -> None:
    """Warn where a schedule's warm-up covers every step of a generation: nothing will be forecast."""
    if num_steps is not None and warmup >= num_steps:
        warn(f"relcache: the warm-up (warmup={warmup}) covers all {num_steps} steps of this generation: every "
             "step computes the cached modules in full and no module output is forecast (a CFG-Cache, where one "
             "is on, keeps its own schedule). Give a warmup below the step count (FasterCache's default, 15, "
             "is diffusers' schedule at 50 steps: about 0.3 x num_steps)", RuntimeWarning)


def _check_warmup(warmup: int) -> int:
    # The first step must be full: nothing exists to predict from before it.
    return check_int("warmup", warmup, 1)


#: ``Interval``'s phases: where the full steps after warm-up fall
PHASES = ("spec", "diffusers")


@dataclass(frozen=True)
class Interval(Schedule):
    """The first ``warmup`` steps are full; after them, one full step every ``interval``.

    ``phase`` places the full steps after warm-up:

    * ``"spec"`` (default, docs/spec.md): ``i = warmup - 1 + j * interval``, one every ``interval`` counted from
      the last warm-up step. With 50 steps and warmup 2 this gives NFC 14, 11, 10, 8, 7 for intervals 4, 5, 6, 7,
      9: the paper's table.
    * ``"diffusers"``: ``(i - warmup - 1) % interval == 0``, diffusers' TaylorSeer: the first full step after
      warm-up comes one step after it, then every ``interval`` (warmup 2, interval 4: 0, 1, 3, 7, 11, ...).
    """

    interval: int = 4
    warmup: int = 2
    phase: str = "spec"

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", check_int("interval", self.interval, 1))
        object.__setattr__(self, "warmup", _check_warmup(self.warmup))
        if not (isinstance(self.phase, str) and self.phase in PHASES):
            raise ConfigError(f"phase must be one of {', '.join(map(repr, PHASES))}, got {self.phase!r}")

    def decide(self, state: object, step: int, probe: torch.Tensor | None,
               measured: torch.Tensor | None = None) -> bool:
        if step < self.warmup:
            return True
        if self.phase == "spec":
            return (step - self.warmup + 1) % self.interval == 0
        return (step - self.warmup - 1) % self.interval == 0

    @property
    def every_step_full(self) -> bool:
        return self.interval == 1

    def new_state(self, num_steps: int | None, reducer: Reducer | None = None) -> None:
        if self.interval > 1:
            _warn_if_warmup_covers(self.warmup, num_steps)
        return None

    def full_steps(self, num_steps: int) -> list[int]:
        """The full steps of a ``num_steps`` generation (for planning and tests)."""
        return [i for i in range(num_steps) if self.decide(None, i, None)]


@dataclass(frozen=True)
class Steps(Schedule):
    """Full exactly at ``steps``, every other step cached: a schedule fixed in advance, e.g. one calibrated for a
    model, sampler and budget by ``relcache.evaluation.steps_search.search_steps`` (ours, issue 19; docs/results.md,
    "Calibrated full steps"). Features that add full steps of their own still do (CFG-Cache's ``refresh_full``, a
    switch of experts).

    ``steps`` must start at 0 (nothing exists to forecast from before the first full step) and increase.
    ``num_steps``, when given, is the generation length the steps were chosen for: a generation that announces
    another length raises ``ConfigError`` at its first step instead of caching steps the list never meant.
    """

    steps: tuple[int, ...] = (0,)
    num_steps: int | None = None
    warmup: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        try:
            if isinstance(self.steps, str | bytes):
                raise TypeError
            steps = tuple(self.steps)
        except TypeError:
            raise ConfigError(
                f"steps must be a sequence of step indices (e.g. [0, 1, 5]), got {self.steps!r}") from None
        steps = tuple(check_int("steps", s, 0) for s in steps)
        if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ConfigError(f"steps must start at 0 and strictly increase, got {list(steps)}")
        object.__setattr__(self, "steps", steps)
        if self.num_steps is not None:
            n = check_int("num_steps", self.num_steps, 1)
            if steps[-1] >= n:
                raise ConfigError(f"steps must all be < num_steps ({n}), got {steps[-1]}")
            object.__setattr__(self, "num_steps", n)

    def check_num_steps(self, num_steps: int | None) -> None:
        if self.num_steps is not None and num_steps is not None and num_steps != self.num_steps:
            raise ConfigError(f"these steps were chosen for a {self.num_steps}-step generation, got {num_steps} steps: "
                              f"calibrate them again for this length (relcache calibrate --steps {num_steps}, or "
                              "relcache.evaluation.steps_search.search_steps in Python). The steps are the transformer "
                              "calls per context that run: an img2img strength runs fewer than num_inference_steps, "
                              "from a later timestep, which a text-to-image calibration of as many steps does not "
                              "match: use search_steps with an error function that runs the img2img pipeline")

    def new_state(self, num_steps: int | None, reducer: Reducer | None = None) -> None:
        self.check_num_steps(num_steps)
        past = [s for s in self.steps if num_steps is not None and s >= num_steps]
        if past:
            warn(f"relcache: full steps {past} are past the end of this {num_steps}-step generation and will "
                          "not run; give Steps the num_steps its list was chosen for to have this refused",
                          RuntimeWarning)
        return None

    def decide(self, state: object, step: int, probe: torch.Tensor | None,
               measured: torch.Tensor | None = None) -> bool:
        return step in self.steps

    @property
    def every_step_full(self) -> bool:
        return self.num_steps is not None and self.steps == tuple(range(self.num_steps))

    def full_steps(self, num_steps: int) -> list[int]:
        """The full steps of a ``num_steps`` generation (for planning and tests)."""
        return [s for s in self.steps if s < num_steps]


def finite_mean(errors: list[float]) -> tuple[float, int]:
    """``(mean of the finite per-sample errors, how many are not finite)``, on the host in double precision (NaN when
    none is finite): the host reads the per-sample errors in one transfer and the device runs no kernel for this.

    A sample whose error is +inf makes the mean +inf: its probe was finite (an infinite probe gives inf / inf, NaN)
    and its forecast overflowed, or met a zero probe with a real error, the worst forecast there is; left out, the
    step was decided by the other samples and stayed cached (a float16 probe near 65504; found by review)."""
    finite = [e for e in errors if math.isfinite(e)]
    if math.inf in errors:
        return math.inf, len(errors) - len(finite)
    return (math.fsum(finite) / len(finite) if finite else math.nan), len(errors) - len(finite)


@dataclass
class InputErrorState:
    """Per-generation memory of RCS: the probe's input history and the accumulated error ``E``."""

    history: DiffHistory
    num_steps: int | None
    accumulated: float = 0.0
    used: int = 0  # full steps so far
    last_full: int | None = None
    tau: float | None = None  # target-NFC mode: the threshold found so far
    errors: dict[int, float] = field(default_factory=dict)  # e(i) at every step after warm-up
    nonfinite: dict[int, int] = field(default_factory=dict)  # steps where samples' errors were not finite: how many
    reducer: Reducer | None = None  # the sequence is split over processes: e(i)'s norms are summed over them


@dataclass(frozen=True)
class InputError(Schedule):
    """RCS: a step is full when the accumulated relative L1 error of the input prediction exceeds ``threshold``.

    At every step after warm-up, at the first cached module: ``Î(i)`` is the order-``order`` Taylor forecast
    of its input from the recorded full steps; ``e(i) = ‖I(i) - Î(i)‖₁ / ‖I(i)‖₁`` per sample, then
    (choice) the mean over the batch; ``E += e(i)``; the step is full when ``E > threshold``, which resets ``E``.
    (choice) The mean is over the samples whose error is finite, so that a sample gone NaN or infinite changes
    nothing for the others (the state's ``nonfinite`` counts such samples per step); when no sample's error is
    finite there is nothing to judge by and the step is full (in target-NFC mode: while the budget lasts).

    ``target_nfc`` instead names the budget (ours, not the paper's). The threshold is then found during the
    generation: the first gap after warm-up is spaced evenly over the remaining budget and ``tau`` is set to
    the error accumulated over it; after each later full step ``tau`` is scaled by the square root of the
    ratio between the mean gap the rest of the budget needs and the mean gap realised so far, and (choice) no
    gap may exceed ``GAP_CAP`` (1.5) times that even gap, or fall short of it divided by ``GAP_FLOOR`` (1.5). Two hard
    rules keep the count: no full step once
    ``target_nfc`` are spent, and every step is full once the steps left equal the budget left. The realized
    NFC is exactly ``target_nfc`` unless ``max_skip`` asks for more (the budget cap wins). ``max_skip``
    bounds the number of consecutive cached steps.
    """

    threshold: float | None = None
    target_nfc: int | None = None
    order: int = 2
    warmup: int = 2
    max_skip: int | None = None
    uses_input: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.target_nfc is None):
            raise ConfigError(
                "exactly one of threshold and target_nfc must be given, got "
                f"threshold={self.threshold!r}, target_nfc={self.target_nfc!r}"
            )
        checked = {"warmup": _check_warmup(self.warmup), "order": check_int("order", self.order, 0, MAX_ORDER)}
        if self.threshold is not None:
            checked["threshold"] = check_float("threshold", self.threshold, low=0)
        if self.target_nfc is not None:
            checked["target_nfc"] = nfc = check_int("target_nfc", self.target_nfc, 1)
            if nfc < checked["warmup"]:
                raise ConfigError(
                    f"target_nfc must be >= warmup ({checked['warmup']}): warm-up steps are full, got {nfc}"
                )
        if self.max_skip is not None:
            checked["max_skip"] = check_int("max_skip", self.max_skip, 1)
        for name, value in checked.items():  # numpy and other integral types stored as int, thresholds as float
            object.__setattr__(self, name, value)

    def release(self, state: InputErrorState) -> None:
        state.history = DiffHistory(self.order)  # the probe's history: tensors of the probe's size

    def check_num_steps(self, num_steps: int | None) -> None:
        if self.target_nfc is not None and num_steps is not None and self.target_nfc > num_steps:
            raise ConfigError(
                f"target_nfc must be <= the number of steps ({num_steps}), got {self.target_nfc}: the steps are "
                "the transformer calls per context the generation runs (an img2img strength runs fewer than "
                "num_inference_steps; Heun-like schedulers about twice as many)"
            )

    def new_state(self, num_steps: int | None, reducer: Reducer | None = None) -> InputErrorState:
        if self.target_nfc is not None:
            if num_steps is None:
                raise ConfigError(
                    "target_nfc needs the number of steps: enable caching on the pipeline (not the bare "
                    "transformer), or call relcache.begin_generation(model, num_steps) before the loop"
                )
            self.check_num_steps(num_steps)
            self._check_max_skip(num_steps)
        else:  # a budget equal to the step count asks for every step full: that is said by the number itself
            _warn_if_warmup_covers(self.warmup, num_steps)
        return InputErrorState(history=DiffHistory(self.order), num_steps=num_steps, reducer=reducer)

    def _check_max_skip(self, num_steps: int) -> None:
        """Warn where the budget cannot keep ``max_skip`` over ``num_steps``: it yields to the budget (the promise made
        to the user), so past the last full step more steps are cached in a row than ``max_skip`` (found by review: the
        spec's choice held without a word)."""
        if self.max_skip is None or self.target_nfc is None:
            return
        need = min(num_steps, self.warmup + (num_steps - self.warmup) // (self.max_skip + 1))
        if self.target_nfc < need:
            warn(f"relcache: target_nfc={self.target_nfc} cannot keep max_skip={self.max_skip} over {num_steps} steps "
                 f"(keeping it needs at least {need} full steps with warmup={self.warmup}): the budget comes first, so "
                 f"more than {self.max_skip} steps will be cached in a row once it is spent. Raise target_nfc, or "
                 "leave max_skip out", RuntimeWarning)

    @staticmethod
    def _has_history_for(state: InputErrorState, shape: torch.Size) -> bool:
        """A probe of this shape was recorded ((choice) a probe of another shape, batch or resolution changed, has
        nothing to forecast from)."""
        hist = state.history
        return hist.ready and hist.diffs[0].shape == shape

    def _forecastable(self, state: InputErrorState, step: int, shape: torch.Size) -> bool:
        """Whether step ``step`` is judged by its input error: after warm-up, with a history for this shape."""
        return step >= self.warmup and self._has_history_for(state, shape)

    def forecast_row(self, state: InputErrorState, step: int) -> list[float] | None:
        if step < self.warmup or not state.history.ready:
            return None
        return step_row(step - state.last_full)

    def measure(self, state: InputErrorState, probe: torch.Tensor, row: torch.Tensor) -> torch.Tensor | None:
        """The per-sample errors ``e(i)`` is the mean of, shape ``(batch,)`` (``finite_mean`` once read on the host)."""
        if not self._has_history_for(state, probe.shape):
            return None
        hist = state.history
        u = hist.direction(row, probe.dtype)
        base = hist.base(probe.dtype)
        # Î(i) - I(i) = base + k · u - I(i), the subtraction in place on the fresh forecast (row[0] = k)
        error = probe - base if u is None else torch.addcmul(base, row[0], u).sub_(probe)
        return sample_relative_l1(error, probe, state.reducer)

    def input_error(self, state: InputErrorState, step: int, probe: torch.Tensor,
                    measured: torch.Tensor | None = None) -> float:
        """``e(i)``: mean over the samples whose error is finite of the per-sample relative L1 error of the input
        forecast (NaN when none is); how many were not finite goes to ``state.nonfinite``. One host read (of
        ``measured`` when given)."""
        if measured is None:
            row = numbers_on(self.forecast_row(state, step), probe.device, row_dtype(probe.dtype))
            measured = self.measure(state, probe, row)
        value, bad = finite_mean(measured.tolist())
        if bad:
            state.nonfinite[step] = int(bad)
        return value

    def decide(self, state: InputErrorState, step: int, probe: torch.Tensor | None,
               measured: torch.Tensor | None = None) -> bool:
        if probe is None:
            raise ValueError("InputError needs the first cached module's input")
        if not self._forecastable(state, step, probe.shape):
            full = True
        else:
            e = self.input_error(state, step, probe, measured)
            state.errors[step] = e
            k = step - state.last_full
            if not math.isfinite(e):  # NaN: no sample's error is finite, nothing to judge by; inf: a sample's
                # forecast failed outright (``finite_mean``). Either way full, not added to E (nor to a calibrating tau)
                full = self.target_nfc is None or self._budget_left(state, step)[0] > 0
            elif self.target_nfc is None:
                state.accumulated += e
                full = state.accumulated > self.threshold
            else:
                state.accumulated += e
                full = self._budget_decision(state, step, k)
            if self.max_skip is not None and k > self.max_skip:  # k - 1 cached steps in a row so far
                full = self.target_nfc is None or self._budget_left(state, step)[0] > 0
        if full:
            self._record_full(state, step, probe)
        return full

    def skipped(self, state: InputErrorState, step: int) -> None:
        """A skipped step spends one of the budget's full steps, as the step the skip stands in for (a CFG batch's
        half-batch step is one of its full steps): the context then runs fewer full steps than ``target_nfc``
        instead of spending them later (found by review: split CFG with ``skip_full=True`` moved the "uncond"
        context's budget to later steps, where "cond" was cached, and saved almost nothing). The probe's history
        and the gap since the last full step are left as they are: nothing was computed."""
        if self.target_nfc is not None:
            state.used += 1

    def _budget_left(self, state: InputErrorState, step: int) -> tuple[int, int]:
        """(full steps left in the budget, steps left including this one)."""
        return self.target_nfc - state.used, state.num_steps - step

    def _budget_decision(self, state: InputErrorState, step: int, k: int) -> bool:
        budget, left = self._budget_left(state, step)
        if budget <= 0:
            return False
        if budget >= left:
            return True
        # the even gap the rest of the budget allows, measured from the last full step
        need = (state.num_steps - state.last_full - 1) / budget
        if state.tau is None:
            if k + 1e-9 >= need:
                state.tau = state.accumulated
                return True
            return False
        # (choice) no gap longer than GAP_CAP even gaps: tau was calibrated early in sampling, and a gap far
        # past what the budget allows means it no longer fits; without the bound the spending piles up at the end
        if k + 1e-9 >= GAP_CAP * need:
            return True
        # (choice) and none shorter than 1 / GAP_FLOOR even gaps: tau's rescaling compounds, and where the early gaps
        # ran long it shrank tau below one step's error, so every step was full until the budget was gone and the
        # last steps were all forecast (found by review: on the reference model K = 20 spent its budget by step 43
        # of 50, with 4x K = 18's error)
        return state.accumulated > state.tau and (GAP_FLOOR is None or k + 1e-9 >= need / GAP_FLOOR)

    def _record_full(self, state: InputErrorState, step: int, probe: torch.Tensor) -> None:
        state.accumulated = 0.0
        gap = None if state.last_full is None else numbers_on(float(step - state.last_full), probe.device,
                                                               row_dtype(probe.dtype))
        state.history.update(probe, gap)
        state.used += 1
        state.last_full = step
        if self.target_nfc is not None and state.tau is not None and step >= self.warmup:
            budget_after = self.target_nfc - state.used
            after_warmup = state.used - self.warmup
            if budget_after > 0 and after_warmup > 0:
                need = (state.num_steps - step - 1) / budget_after
                realised = (step - self.warmup + 1) / after_warmup
                state.tau *= math.sqrt(need / realised)
