"""Per cached module, at each step: forecast it, or compute it and record its output (``ModuleCalls``, the part of a
``controller.Session`` that the module hooks call; ``hooks.ModuleHost``).

A module follows its step's decision (``steps.py``), taken before the first expensive module runs: RCS decides here,
at the first cached module, when the step is still undecided. A module runs anyway when its row group has no state
recorded on inputs of this shape (its first step, or the batch or resolution changed).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import ConfigError, UnsupportedModelError
from ..methods.config import CacheConfig
from ..methods.history import relative_l1
from ..methods.predictors import Forecast
from ..models.base import CachedModule
from .accounting import Shapes
from .context import Context, ModuleCaches, ModuleRecord, RowGroup, hold_state, ready
from .steps import take_rows


class Computing(NamedTuple):
    """A module the step let run: what its output must be recorded into (``ModuleCalls._record``)."""

    ctx: Context
    shapes: Shapes  # the whole call's input shapes
    groups: list[RowGroup]


class ModuleSlot:
    """A cached module as its hook reaches it: its spec and index, and the record of the running context's caches
    for it (``ModuleRecord``, bound by ``ModuleCalls.bind_slots`` when the context changes). The hook's traced code
    reads the module's state from here by attribute: a Python int read in traced code is a constant of the graph, so
    while it read the module's index each block compiled on its own (regional compilation) needed graphs of its own.
    ``position``: the index as a tensor, on the step rows' device, for traced code to pick the module's row with (only
    where ``apart``: in a whole-model graph the row is picked by the index, a constant of the one graph that holds
    every module, with no input more; static buffers for capture are still keyed by the index)."""

    def __init__(self, idx: int, spec: CachedModule) -> None:
        self.idx = idx
        self.spec = spec
        self.record: ModuleRecord | None = None
        self.computing: Computing | None = None  # the module is running: what its output is recorded into
        self.position: torch.Tensor | None = None
        # the module sits in a block compiled on its own (``regional.cached_apart``, set with ``position`` at each
        # context's first call of a generation): its traced code picks its step row by ``position``. Elsewhere by its
        # index, a constant of the one graph that holds every module (whole-model compile)
        self.apart = False
        self.next: ModuleSlot | None = None  # the module after it (offloaded caches prefetch its states)

    def place(self, device: torch.device | None) -> None:
        """Have ``position`` on ``device`` where the module is ``apart``, else none (on the host: a tensor made in
        traced code would be a constant)."""
        if not self.apart or device is None:
            self.position = None
        elif self.position is None or self.position.device != device:
            self.position = torch.tensor([self.idx], device=device)


def _input_for_output(inputs: tuple[torch.Tensor, ...], j: int, n_out: int) -> torch.Tensor:
    """The input that output ``j`` relates to: its own stream's when inputs and outputs pair up."""
    return inputs[j] if len(inputs) == n_out else inputs[0]


def _row(rows: torch.Tensor, slot: ModuleSlot, device: torch.device) -> torch.Tensor:
    """The slot's module's row of the step's ``rows`` on ``device`` (its ``k`` first: the gap where it records). In
    traced code picked by the slot's ``position`` tensor (a graph input), so that blocks share graphs."""
    position = slot.position
    if torch.compiler.is_compiling() and position is not None and position.device == rows.device:
        row = rows.index_select(0, position)[0]
    else:
        row = rows[slot.idx]
    return row if row.device == device else row.to(device)  # a model split over devices


def _predict(config: CacheConfig, ctx: Context, slot: ModuleSlot, groups: list[RowGroup], eager: bool
             ) -> list[torch.Tensor]:
    """The slot's module's forecast outputs, each group's forecast from its own states, rows in call order. ``eager``:
    the call is neither compiled nor captured by hand, so the forecasts may read the step's ``k`` on the host."""
    items = []  # every output of every group, in call order
    # compiled code must not read k as a Python number (a constant in the graph), nor may a step captured by hand with
    # static caches (a CUDA graph replays the captured kernel, k included, while its rows are updated in place)
    eager = eager and ctx.static is None
    offloads = ctx.storage is not None and ctx.storage.offload
    record = slot.record
    for group in groups:
        if offloads and slot.next is not None and slot.next.record is not None:
            # offloaded caches: the next module's start copying back now (``CacheStorage(offload=True)``)
            for st in slot.next.record.states.get(group.name, ()):
                st.prefetch()
        states = record.states[group.name]
        row = _row(ctx.caches.rows[group.name], slot, group.inputs[0].device)
        k = ctx.caches.host_k[group.name][slot.idx] if eager else None
        items += [Forecast(st, _input_for_output(group.inputs, j, len(states)), row, k) for j, st in enumerate(states)]
    outs = config.predictor.forecast_many(items)  # under context parallelism: one collective for all of them
    if len(groups) == 1:
        return outs
    n = len(outs) // len(groups)
    return [torch.cat(outs[j::n]) for j in range(n)]


def _check_intact(record: ModuleRecord, name: str, groups: list[RowGroup]) -> None:
    """Refuse a model that wrote into a cached module's output in place after the module returned it: the cache holds
    that very tensor (as computed), so it changed too, and every cached step would forecast from the changed one."""
    for group in groups:
        for st in record.states[group.name]:
            if st.out.changed_in_place():
                raise UnsupportedModelError(
                    f"the model wrote into cached module {name!r}'s output in place after the module returned it "
                    "(e.g. out.mul_(gate)); relcache holds that output to forecast from, so it must not change: "
                    "write out = out * gate instead")


def _check_call(spec: CachedModule, idx: int, inputs: tuple[Any, ...], called: set[int]) -> None:
    """Refuse a second call of a cached module within one transformer call (each would get the other's forecast at a
    cached step), and a probe index past the module's inputs, naming the module."""
    if idx in called:
        raise UnsupportedModelError(
            f"the cached module {spec.name!r} was called twice in one call of the transformer: each call would get "
            "the same forecast at a cached step; a cached module must be called exactly once per transformer call "
            "(not in a loop, not shared between blocks): cache another module (docs/custom-models.md)")
    called.add(idx)
    if spec.probe >= len(inputs):
        raise ConfigError(f"the probe index {spec.probe} of cached module {spec.name!r} is past its {len(inputs)} "
                          "input(s) (the adapter's input_of): give an index below that (CustomAdapter probe=)")


def _check_batch(spec: CachedModule, shapes: tuple[tuple[int, ...], ...], outs: tuple[torch.Tensor, ...]) -> None:
    """Refuse inputs whose leading axis is not the outputs' batch (the rows cut for CFG, and RFE's per-sample norms,
    take it for one), naming the module: found by review, an ``input_of`` giving another tensor failed at the first
    cached step in a broadcast error that named nothing."""
    batch = tuple(outs[0].shape[:1])
    for i, shape in enumerate(shapes):
        if tuple(shape[:1]) != batch:
            raise ConfigError(
                f"input {i} of cached module {spec.name!r} has shape {tuple(shape)}, but its output's leading axis "
                f"(the batch) is {batch[0] if batch else 'missing'}: the adapter's input_of must give the tensor(s) "
                "the module reads, batch first (CustomAdapter input_of=, docs/custom-models.md)")


class ModuleCalls:
    """``module_forward`` and what it needs, mixed into ``controller.Session``: it reads the session's ``config``,
    ``current`` context, ``cached_modules``, ``meter``, ``budget``, ``prober``, ``record_errors``, ``reducer``,
    ``_decide``, ``_called`` (the modules the running call has called, eagerly) and ``_compiled_call`` (the call runs
    compiled and is counted whole at its end, ``StepCalls.end_call``), and owns the session's ``slots`` (one
    ``ModuleSlot`` per cached module: its record in the running context's caches, bound by ``bind_slots``, and
    ``computing``, what a module the current step lets run records into) and ``_bound``."""

    # -- relcache.runtime.hooks.ModuleHost --------------------------------------------------
    def module_forward(self, slot: ModuleSlot, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = slot.spec
        if self.budget.probe is not None:  # a fake-tensor run for the cache budget: shapes only
            return self.budget.probe.run(slot.idx, spec, original, args, kwargs)
        if self.prober.active:  # the pre-pass of a compiled RCS step stops at the first cached module
            self.prober.stop(spec.inputs(args, kwargs)[spec.probe])
        # Under torch.compile this is traced: it reads the step's decision (a bool) and its rows (tensors), never a
        # step number, so each kind of step compiles once; and the module's state by the slot's attributes, never by
        # its index, so that blocks compiled one by one share graphs. Only an undecided step (RCS) calls the host.
        forecast = self._forecast(slot, original, args, kwargs)
        if forecast is not None:
            return forecast
        if torch.compiler.is_compiling():  # no FLOP counting in compiled code
            out = original(*args, **kwargs)
        else:
            computing = slot.computing
            key = None if computing is None else (slot.idx, computing.shapes)
            out = self.meter.run_module(key, original, args, kwargs)
        self._record(slot, out)
        return out

    def bind_slots(self, caches: ModuleCaches | None) -> None:
        """Point each module's slot at its record in ``caches`` (the running context's; None: at none)."""
        if self._bound is caches:
            return
        self._bound = caches
        for slot in self.slots:
            slot.record = None if caches is None else caches.record(slot.idx)

    def clear_computing(self) -> None:
        """No module is running (a call's state was put back, or the session ends)."""
        for slot in self.slots:
            slot.computing = None

    def _forecast(self, slot: ModuleSlot, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The forecast at a cached step, or None when the module must run (``_record`` then takes its output)."""
        if slot.computing is not None:  # only then: in traced code an attribute set is a side effect dynamo replays
            slot.computing = None
        ctx = self.current
        if ctx is None:  # called outside a transformer forward: behave as the plain module
            return None
        spec = slot.spec
        inputs = spec.inputs(args, kwargs)  # dual-stream modules: one input per output
        eager = not torch.compiler.is_compiling()
        if eager:  # the rules of docs/custom-models.md, checked on the eager calls
            _check_call(spec, slot.idx, inputs, self._called)
        probe = inputs[spec.probe]
        rows = ctx.cfg.row_groups(probe.shape[0])
        if not ctx.schedule.decided:
            self._decide(ctx, probe, rows)
        shapes = tuple([tuple(x.shape) for x in inputs])
        record = slot.record
        record.call_shapes = shapes
        groups = [RowGroup.of(name, sl, inputs, shapes) for name, sl in rows]
        if ctx.schedule.full or not all(ready(record, g.name, g.shapes) for g in groups):
            slot.computing = Computing(ctx, shapes, groups)
            return None
        if eager:
            _check_intact(record, spec.name, groups)
        preds = _predict(self.config, ctx, slot, groups, eager)
        if eager and not self._counted_at_end():
            self.meter.count_forecast(ctx.counters, slot.idx, shapes, ctx.cfg.batch_scale)
        if self.record_errors:
            trues = spec.outputs(original(*args, **kwargs))
            ctx.caches.errors.setdefault(slot.idx, {})[ctx.step] = relative_l1(preds[0], trues[0], self.reducer)
        tuple_out = record.tuple_out  # recorded with the states; were it unset (no type), a tensor is returned
        return spec.returned(preds, tuple_out if isinstance(tuple_out, type) else None)

    def _counted_at_end(self) -> bool:
        """Whether the running call is counted whole at its end (``StepCalls.end_call``): it runs compiled, so a module
        that runs eagerly within it (after a graph break in the model) must not count itself too. Not where dynamo
        ran the call's forward eagerly: ``run_call`` then counts it module by module."""
        return self._compiled_call and not self.meter.counted

    def _record(self, slot: ModuleSlot, out: Any) -> None:
        """Update the slot's predictor states with the output its module just computed (if ``_forecast`` let it run)."""
        computing = slot.computing
        if computing is None:
            return
        slot.computing = None
        ctx, caches = computing.ctx, computing.ctx.caches
        record = slot.record
        eager = not torch.compiler.is_compiling()
        outs = slot.spec.outputs(out)
        record.tuple_out = type(out) if isinstance(out, tuple) else None
        predictor = self.config.predictor
        for group in computing.groups:
            states = record.states.get(group.name)
            if states is None or len(states) != len(outs):
                if eager:  # a first record of these shapes
                    _check_batch(slot.spec, computing.shapes, outs)
                reducer = {} if self.reducer is None else {"reducer": self.reducer}
                states = [predictor.new_state(ctx.storage, **reducer) for _ in outs]
                record.states[group.name] = states
            k = _row(caches.rows[group.name], slot, group.inputs[0].device)[0]  # the gap N where a record precedes
            # at a full step every slot has a record step (``prepare_step``): no read of the dict of step numbers,
            # on which torch 2.11's dynamo guards by value (a recompile whenever one moves)
            gap = k if ctx.schedule.full or group.name in record.last_record else None
            for j, (state, o) in enumerate(zip(states, outs, strict=True)):
                inp = _input_for_output(group.inputs, j, len(outs))
                value = take_rows(o, group.rows)
                predictor.record(state, inp, value, gap)
                if ctx.static is not None:  # copied into buffers at stable addresses (capture)
                    hold_state(ctx.static, (ctx.name, slot.idx, group.name, j), state, value, k)
            record.shapes[group.name] = group.shapes
            if not ctx.schedule.full:  # a module computed at a cached step (no state for these shapes yet)
                record.last_record[group.name] = ctx.step
            elif eager:  # recorded: its record step is this step's (``end_step``)
                caches.unrecorded.pop((slot.idx, group.name), None)
        # a write, never read in traced code (no guard): where blocks compile one by one, each block's graph applies
        # its records when it returns, and a later block that raises must not put this module's record steps back
        record.recorded = True
        if eager and not self._counted_at_end():
            self.meter.count_computed(ctx.counters, slot.idx, computing.shapes, ctx.cfg.batch_scale)
