"""The step's single decision and what its modules need from it, settled on the host (docs/spec.md, §Decision).

A step is decided once per context: a schedule that reads no input at the step's start, RCS at the first cached
module, or, when the forward is compiled, from an eager pre-pass that stops at that module (``Prober``). Once
decided, the step hands its modules one tensor of rows per row group (``history.step_row``), so that forecasts
and records read steps as data and compiled code never specialises on a step number.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..methods.config import CacheConfig
from ..methods.history import host_numbers, numbers_on, row_dtype
from .context import Context
from .distributed import SequenceReducer

MAX_HOST_ROWS = 256  # host tensors of step rows kept per context (``kept_rows``); past it they are made anew

#: a call's row groups: (name, rows of the batch or None for all)
RowGroups = list[tuple[str, slice | None]]


def take_rows(x: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def probe_rows(x: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """The rows of the first cached module's input that RCS reads and keeps: a CFG batch's conditional half (the
    half that runs at every step), else all of them."""
    return take_rows(x, next(sl for name, sl in groups if name != "uncond"))


@torch.compiler.disable
def decide(config: CacheConfig, num_steps: int | None, n_modules: int, ctx: Context, probe_input: torch.Tensor,
           groups: RowGroups, reducer: SequenceReducer | None = None, measured: torch.Tensor | None = None) -> None:
    """Take ``ctx``'s decision for its current step, and prepare the step's rows. ``probe_input`` is the first cached
    module's input (RCS reads the conditional half of a CFG batch: the half that runs at every step) or, for a
    schedule that reads none, any tensor of the call (its device is where the rows go). ``reducer``: the sequence
    is split over processes (context parallelism), and the decision makes one guarded collective (distributed.py).
    ``measured``: the schedule's measurement of the probe, taken in compiled code (``Prober.measure``)."""
    probe = None
    if config.schedule.uses_input:
        probe = probe_rows(probe_input, groups)
    take_decision(config, ctx, probe, probe_input, reducer, measured, num_steps)
    prepare_step(config, num_steps, n_modules, ctx, [name for name, _ in groups], probe_input)


def take_decision(config: CacheConfig, ctx: Context, probe: torch.Tensor | None, like: torch.Tensor,
                  reducer: SequenceReducer | None = None, measured: torch.Tensor | None = None,
                  num_steps: int | None = None) -> bool:
    """Only the decision of ``decide`` (``probe``: the conditional rows of the first cached module's input, for RCS;
    ``like``: a tensor of the call, for the device): CFG-Cache takes it before the call's row groups are known;
    ``prepare_step`` must follow."""
    progress = ctx.schedule
    progress.decided = True
    if reducer is not None:  # context parallelism: the next collective carries the guard
        reducer.begin_step(ctx.name, ctx.step, progress.full_steps, like, num_steps)
    progress.full = config.schedule.decide(progress.memory, ctx.step, probe, measured)
    if reducer is not None:  # the guard's collective, if the decision made none
        reducer.end_decision(progress.full)
    if progress.full:
        progress.full_steps.append(ctx.step)
    return progress.full


def prepare_step(config: CacheConfig, num_steps: int | None, n_modules: int, ctx: Context, names: list[str],
                 like: torch.Tensor) -> None:
    """The rest of ``decide`` once the decision is taken: the step's rows for the row groups ``names``."""
    _prepare_rows(config, num_steps, n_modules, ctx, names, like)
    mark_records(ctx, n_modules)


def mark_records(ctx: Context, n_modules: int) -> None:
    """At a full step, every module records in the step's row groups (those ``_prepare_rows`` made rows for) at this
    step: set here, on the host, because compiled code must not read the step number; ``end_step`` puts back the slots
    a raising call did not record. Also run again after a call's state was put back (``Context.snapshot``) where the
    step was decided during that call: the decision stands, and so do its record steps."""
    caches = ctx.caches
    unrecorded = caches.unrecorded = {}
    if ctx.schedule.full and caches.rows:
        records = [caches.record(i) for i in range(n_modules)]
        for record in records:
            record.recorded = False
        step, lasts = ctx.step, [record.last_record for record in records]
        for name in caches.rows:
            for i, last in enumerate(lasts):
                unrecorded[(i, name)] = last.get(name)
                last[name] = step


def end_step(ctx: Context, completed: bool) -> None:
    """The call of ``ctx``'s step returned (``completed``) or raised. After a full-step call that raised, each slot
    that had not recorded gets its previous record step back: its state is still the one recorded then, and the next
    forecast's ``k`` must count from there. A slot recorded where its module's record says so (``recorded``, set
    by every record, eager or compiled): an eager call also drops it from ``unrecorded`` as it records; a compiled
    graph that raised applied none of its records, but where blocks compile one by one (or a graph break splits
    the forward) the graphs that returned before it applied theirs (found by review, 2026-12-06)."""
    caches = ctx.caches
    if not completed:
        for (idx, name), step in caches.unrecorded.items():
            record = caches.record(idx)
            if record.recorded:
                continue
            last = record.last_record
            if step is None:
                last.pop(name, None)
            else:
                last[name] = step
    caches.unrecorded = {}


def kept_rows(ctx: Context, tag: Hashable, distinct: list[list[float]], rows: list[list[float]], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``rows`` as a host tensor for ``device`` (``host_numbers``), made once per context and key and only read
    after: building a tensor from nested lists at every call was most of a compiled cached step's own bookkeeping.
    ``tag`` and the ``distinct`` rows must say ``rows`` whole; each number is keyed by its bits (``float.hex``), as
    -0.0 and 0.0 compare equal and NaN equals nothing."""
    memo = ctx.caches.host_rows
    key = (tag, tuple([tuple([float(v).hex() for v in r]) for r in distinct]), dtype, device.type)
    host = memo.get(key)
    if host is None:
        if len(memo) >= MAX_HOST_ROWS:
            memo.clear()
        host = memo[key] = host_numbers(rows, dtype, device)
    return host


def _prepare_rows(config: CacheConfig, num_steps: int | None, n_modules: int, ctx: Context, names: list[str],
                  like: torch.Tensor) -> None:
    """One tensor per row group: row ``i`` is ``step_row(k)`` for module ``i``, ``k`` steps after that module's latest
    record in that group (its gap ``N`` when it records at this step)."""
    step, by_k = ctx.step, {}
    ctx.caches.rows, ctx.caches.host_k = {}, {}
    dtype = row_dtype(like.dtype)
    # each module's record steps by group, read straight from its record (every call: host time a step waits on)
    lasts = [getattr(ctx.caches.records.get(i), "last_record", None) or {} for i in range(n_modules)]
    for name in names:
        ks = tuple([step - last.get(name, step) for last in lasts])
        for k in ks:
            if k not in by_k:
                by_k[k] = config.predictor.row(k, step, num_steps)
        ctx.caches.host_k[name] = [by_k[k][0] for k in ks]
        # the table is said whole by each module's k and each k's row in order of first use
        host = kept_rows(ctx, ks, [by_k[k] for k in dict.fromkeys(ks)], [by_k[k] for k in ks], dtype, like.device)
        if ctx.static is None:
            ctx.caches.rows[name] = numbers_on(host, like.device, dtype)
        else:  # written into the same tensor at every step: a static input of the step's CUDA graph
            ctx.caches.rows[name] = ctx.static.put_numbers((ctx.name, "rows", name), host, like.device, dtype)


class _Probed(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by the first cached module during a pre-pass; ``args[0]`` is its input. (No ``__init__`` of its own:
    dynamo traces raising and catching it only as a plain exception.)"""


@dataclass
class Probing:
    """A compiled RCS step's pending pre-pass: the forward's arguments as this call runs them, and the schedule's
    forecast row on the device (None: the decision needs the probe but no measurement of it)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    row: torch.Tensor | None


class Prober:
    """A pre-pass of the forward that stops at its first cached module, for that module's input: what RCS reads.
    Under ``torch.compile`` it is traced, with the schedule's measurement of that input, into the first graph of the
    step; the step's one host read follows (its one graph break), then the forward's graphs. It repeats the forward's
    cheap prefix (embeddings, the first block's norm)."""

    def __init__(self) -> None:
        self.active = False  # a pre-pass is running: the first cached module calls ``stop``

    def run(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        self.active = True
        try:
            forward(*args, **kwargs)
        except _Probed as probed:
            return probed.args[0]
        finally:
            self.active = False
        raise RuntimeError("the transformer returned without calling its first cached module")

    def measure(self, config: CacheConfig, ctx: Context, forward: Callable[..., Any], probing: Probing
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pre-pass and the schedule's measurement of its conditional rows, tensors only: (probe, measured)."""
        probe = self.run(forward, probing.args, probing.kwargs)
        if probing.row is None:
            return probe, None
        cond = probe_rows(probe, ctx.cfg.row_groups(probe.shape[0]))
        return probe, config.schedule.measure(ctx.schedule.memory, cond, probing.row)

    @staticmethod
    def stop(probe: torch.Tensor) -> None:
        """At the first cached module: end the pre-pass with its probe input (``CachedModule.probe``)."""
        raise _Probed(probe)
