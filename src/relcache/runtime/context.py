"""Per-context state: what one call context (``"default"``, or ``"cond"``/``"uncond"`` of split CFG) holds during a
generation, as small named records: where its schedule stands, its module caches, its FLOP counters and how its
calls relate to a CFG batch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..methods.history import StaticCaches, row_dtype
from ..methods.state import PredictorState
from ..methods.storage import CacheStorage
from .accounting import Counters, Shapes
from .cfg import CFGRouting, Rows
from .stats import UNKNOWN_FLOPS, ContextStats, fraction


def _copy_state(state: PredictorState) -> PredictorState:
    """A copy of a predictor state that a later record does not change (it replaces tensors and lists)."""
    new = copy.copy(state)
    new.out = copy.copy(state.out)  # the output's divided differences (a record replaces their list)
    return new


@dataclass
class ScheduleProgress:
    """The schedule's side of a context: its per-generation memory, this step's decision, the full steps so far."""

    memory: object  # ``Schedule.new_state(num_steps)``
    decided: bool = False  # this step's decision was taken (``steps.decide``)
    full: bool = True  # this step is full
    full_steps: list[int] = field(default_factory=list)


_ABSENT = object()  # a module's ``call_shapes`` or ``tuple_out`` not set yet in its record


class ModuleRecord:
    """One cached module's caches in one context: what its hook's traced code reads and writes, reached through the
    hook's ``ModuleSlot`` by attributes rather than by the module's index. Blocks compiled one by one (regional
    compilation) then share graphs: dynamo guards attributes of objects it reaches from the block, and two blocks'
    records differ only in their tensors (graph inputs), where an index was a constant of each block's graph."""

    def __init__(self) -> None:
        self.states: dict[str, list[PredictorState]] = {}  # per row group: one state per output tensor
        self.shapes: dict[str, Shapes] = {}  # per row group: the input shapes its states were recorded on
        self.last_record: dict[str, int] = {}  # per row group: its latest record step
        self.call_shapes: object = _ABSENT  # the module's last whole-call input shapes
        self.tuple_out: object = _ABSENT  # the tuple type it returns (None: a tensor)
        self.recorded = False  # recorded since the running full step's start (``steps.mark_records``, ``end_step``)

    def clear(self) -> None:
        """Forget everything, in place (the hooks' slots hold this record)."""
        self.states.clear()
        self.shapes.clear()
        self.last_record.clear()
        self.call_shapes = self.tuple_out = _ABSENT
        self.recorded = False

    def saved(self) -> ModuleRecord:
        """A copy that later records do not change (``put_back`` restores it): the dicts copied, the predictor
        states shallowly (``_copy_state``)."""
        copied = ModuleRecord()
        copied.states = {group: [_copy_state(st) for st in states] for group, states in self.states.items()}
        copied.shapes = dict(self.shapes)
        copied.last_record = dict(self.last_record)
        copied.call_shapes, copied.tuple_out = self.call_shapes, self.tuple_out
        return copied

    def put_back(self, saved: ModuleRecord | None) -> None:
        """Hold again what ``saved`` (a copy from ``saved()``; None: nothing) holds, in place."""
        self.clear()
        if saved is not None:
            self.states.update(saved.states)
            self.shapes.update(saved.shapes)
            self.last_record.update(saved.last_record)
            self.call_shapes, self.tuple_out = saved.call_shapes, saved.tuple_out


class ModuleCaches:
    """The predictors' side: per cached module a ``ModuleRecord`` (its predictor states per row group, one per output
    tensor, the input shapes they were recorded on, its record steps), in the order modules were first touched.
    Records are never removed: the hooks' slots hold them (``ModuleCalls.bind_slots``)."""

    def __init__(self) -> None:
        self.records: dict[int, ModuleRecord] = {}
        self.errors: dict[int, dict[int, float]] = {}  # record_errors: step -> rel. L1 per module
        self.rows: dict[str, torch.Tensor] = {}  # this step's rows per group: (modules, row length)
        # each module's k at this step per group, on the host: eager forecasts read it (fewer kernels), compiled never
        self.host_k: dict[str, list[float]] = {}
        # at a full step, the (module, group) slots that have not recorded yet and their record step before it (None:
        # none): a call that raises puts these back, so that each slot's record step stays the step its state was
        # recorded at
        self.unrecorded: dict[tuple[int, str], int | None] = {}
        # host tensors of step rows already made, by what they hold (``steps.kept_rows``): a step of the same gaps
        # copies one instead of building a tensor from nested lists again
        self.host_rows: dict[tuple, torch.Tensor] = {}

    def record(self, idx: int) -> ModuleRecord:
        """Module ``idx``'s record (made empty on first use)."""
        record = self.records.get(idx)
        if record is None:
            record = self.records[idx] = ModuleRecord()
        return record

    def holds_states(self) -> bool:
        """Whether any module has predictor states (stops at the first that has)."""
        return any(r.states for r in self.records.values())

    def clear_states(self) -> None:
        """Drop every module's predictor states (the rest of each record stays)."""
        for record in self.records.values():
            record.states.clear()

    def called_shapes(self) -> list[tuple[int, Shapes]]:
        """(module index, its last whole-call input shapes) of each module called so far, in the records' order: what
        the FLOP meter counts a call by where its modules did not count themselves (``StepCalls.end_call``)."""
        return [(idx, r.call_shapes) for idx, r in self.records.items() if r.call_shapes is not _ABSENT]

    @property
    def nbytes(self) -> int:
        return sum(st.nbytes for r in self.records.values() for states in r.states.values() for st in states)

    def nbytes_by_module(self) -> dict[int, int]:
        """Bytes held per cached module (all its row groups and outputs)."""
        held: dict[int, int] = {}
        for idx, r in self.records.items():
            if r.states:
                held[idx] = sum(st.nbytes for states in r.states.values() for st in states)
        return held


def ready(record: ModuleRecord, group: str, shapes: Shapes) -> bool:
    """Whether ``record``'s row group has states recorded on inputs of ``shapes`` (it can be forecast)."""
    return record.states.get(group) is not None and record.shapes.get(group) == shapes


class RowGroup(NamedTuple):
    """One row group of a cached module's call: its name, rows, inputs (cut to those rows) and their shapes."""

    name: str
    rows: Rows
    inputs: tuple[torch.Tensor, ...]
    shapes: Shapes

    @classmethod
    def of(cls, name: str, rows: Rows, inputs: tuple[torch.Tensor, ...], shapes: Shapes) -> RowGroup:
        """The group of ``rows`` (None: all, whose ``shapes`` are given) of the call's ``inputs``."""
        if rows is None:
            return cls(name, None, inputs, shapes)
        xs = tuple(x[rows] for x in inputs)
        return cls(name, rows, xs, tuple(tuple(x.shape) for x in xs))


class Context:
    """One call context's state in the current generation."""

    def __init__(self, name: str, schedule_memory: object) -> None:
        self.name = name
        self.step = -1
        self.last_timestep: float | None = None
        self.schedule = ScheduleProgress(schedule_memory)
        self.caches = ModuleCaches()
        self.counters = Counters()
        self.cfg = CFGRouting()
        self.signatures: set[tuple] = set()  # the call shapes seen in this generation
        self.storage: CacheStorage | None = None  # how the predictor states hold tensors (``CacheConfig``/budget)
        self.planned_bytes = 0  # what they will hold with full histories, where a budget was checked
        self.peak_bytes = 0  # the most ``cache_bytes`` held at the end of a call, and per module then
        self.peak_by_module: dict[int, int] = {}
        self.static: StaticCaches | None = None  # where caches are held in place for capture (docs/spec.md, §Capture)

    def note_peak(self, deferred: bool = False) -> None:
        """Update the peak with what the caches hold now (at the end of a call).

        Skipped at a cached step where no module recorded (each forecast one; ``deferred`` False): the caches then
        hold what they held at the previous call's end, already noted. Summing every state's tensors costs 40-80 µs a
        call at DiT-XL/2's depth, host time that a compiled cached step waits on. ``deferred``: states may change
        between records (a split sequence's ratios arrive with the next step's collective), so every call sums."""
        if not (deferred or self.schedule.full
                or any(self.step in r.last_record.values() for r in self.caches.records.values())):
            return
        held = self.cache_bytes
        if held > self.peak_bytes:
            self.peak_bytes = held
            self.peak_by_module = self.caches.nbytes_by_module()

    def advance(self, step_index: int | None, timestep: float | None) -> None:
        """Start this context's next step (``step_index`` from diffusers' cache context, else one more)."""
        self.step = step_index if step_index is not None else self.step + 1
        self.last_timestep = timestep
        self.schedule.decided = False
        self.cfg.new_call()

    @property
    def cache_bytes(self) -> int:
        """Bytes held by this context's predictor states and its schedule's input history."""
        history = getattr(self.schedule.memory, "history", None)
        return self.caches.nbytes + (history.nbytes if history is not None else 0)

    def snapshot(self) -> Callable[[], None]:
        """Save what a call's modules change (predictor states, record steps, errors, counters) and return how to put
        it back. Predictor states are copied shallowly: a record replaces their tensors, it never writes into them
        (held in place for capture, the buffers' contents are saved too)."""
        caches = self.caches
        records = {idx: record.saved() for idx, record in caches.records.items()}
        unrecorded = dict(caches.unrecorded)
        errors = {i: dict(e) for i, e in caches.errors.items()}
        counters = copy.copy(self.counters)
        restore_static = self.static.snapshot() if self.static is not None else None  # in-place caches: contents

        def restore() -> None:
            if restore_static is not None:
                restore_static()
            for idx, record in caches.records.items():  # a record made during the call is emptied (slots hold it)
                record.put_back(records.get(idx))
            for name, held in (("unrecorded", unrecorded), ("errors", errors)):
                table = getattr(caches, name)
                table.clear()
                table.update(held)
            self.counters.__dict__.update(vars(counters))

        return restore

    def stats(self, module_names: list[str], flops_unknown: str | None = None) -> ContextStats:
        """The context's stats so far; ``flops_unknown``: why its FLOPs could not be counted (they read NaN)."""
        c = self.counters
        st = ContextStats(
            name=self.name,
            num_steps=self.step + 1,
            full_steps=list(self.schedule.full_steps),
            nfc=len(self.schedule.full_steps),
            flops_fraction=fraction(c.executed, c.full),
            executed_flops=c.executed,
            full_flops=c.full,
            input_errors=dict(getattr(self.schedule.memory, "errors", None) or {}),
            module_errors={module_names[i]: dict(e) for i, e in self.caches.errors.items()},
            uncond_skipped_steps=list(self.cfg.uncond_skipped),
            model_flops_fraction=fraction(c.model_executed, c.model_full),
            model_executed_flops=c.model_executed,
            model_full_flops=c.model_full,
            cache_bytes=self.cache_bytes,
            peak_cache_bytes=self.peak_bytes,
            peak_module_bytes={module_names[i]: n for i, n in sorted(self.peak_by_module.items())},
            cache_storage="as computed" if self.storage is None else self.storage.label,
            nonfinite_samples=dict(getattr(self.schedule.memory, "nonfinite", None) or {}),
        )
        return st if flops_unknown is None else replace(st, flops_unknown=flops_unknown, **UNKNOWN_FLOPS)


def hold_state(static: StaticCaches, key: tuple, state: PredictorState, value: torch.Tensor, gap_like: torch.Tensor
               ) -> None:
    """Move what a record just put in ``state`` (``value`` recorded, ``gap_like`` a 0-d tensor of the rows' dtype and
    device) into ``static``'s buffers under ``key``: the output's differences and gap, and RFE's input, ratio and Gram.
    Values are copied unchanged, so forecasts are bit-identical to the state held out of place. What a predictor
    keeps besides (``PredictorState.hold_extra``) goes first: it may still read buffers the rest then overwrites."""
    state.hold_extra(static, key, value, gap_like)
    static.hold_history((key, "out"), state.out, value, gap_like)
    if state.inp is None:
        return
    state.inp = static.hold((key, "inp"), state.inp)
    if not torch.compiler.is_compiling():  # the ratio exists from the second record: reserved at the first
        static.reserve((key, "ratio"), value.new_zeros(value.shape[0], dtype=row_dtype(value.dtype)))
    if state.ratio is not None:
        state.ratio = static.put((key, "ratio"), state.ratio)
    if not torch.compiler.is_compiling():  # the Gram of each order (compiled records take it), reserved at once
        for m in range(1, state.out.max_order + 1):
            static.reserve((key, "gram", m), value.new_zeros(value.shape[0], m, m, dtype=row_dtype(value.dtype)))
    if state.gram is not None:
        state.gram = static.put((key, "gram", state.gram.shape[-1]), state.gram)
