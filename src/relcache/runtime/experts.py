"""Pipelines whose generation runs several transformers in turn (Wan 2.2: ``transformer`` for the high-noise steps,
``transformer_2`` for the low-noise ones), served by one ``Session`` (docs/spec.md, §Several transformers).

The session lists every expert's cached modules one after the other (each expert owns a span of module indices, so
its predictor states never mix with another's) and keeps one generation, one step clock and one schedule state per
call context across the experts. This file holds what is particular to experts: which expert a call runs, what a
switch does to a context (the previous expert's caches dropped, the schedule's input history restarted, the step
forced full), and the stats of each expert.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from torch import nn

from ..methods.config import CacheConfig
from .accounting import Counters
from .context import Context
from .stats import CacheStats, ContextStats, combine, fraction


class Expert(NamedTuple):
    """One transformer of the pipeline: its attribute name, the module and its span of cached-module indices."""

    name: str
    model: nn.Module
    span: range


@dataclass
class _Segment:
    """A run of consecutive steps of one context served by one expert: from ``first`` on, the context's counters
    then (what the expert ran is the difference to the next segment's, or to the counters now)."""

    expert: int
    first: int
    counters: Counters


class Experts:
    """The experts of one session, which one runs now, and each context's segments in the current generation."""

    def __init__(self, experts: list[Expert]) -> None:
        if len(experts) < 2:
            raise ValueError("Experts serves two or more transformers")
        self.experts = list(experts)
        self.running = 0  # the expert whose call runs now (set by its step hook)
        self._last_call: int | None = None  # the expert of the previous call, any context
        self._segments: dict[str, list[_Segment]] = {}
        self._forced: set[str] = set()  # contexts whose current step must be full (a switch)

    def of_module(self, idx: int) -> Expert:
        """The expert owning cached module ``idx``."""
        return next(e for e in self.experts if idx in e.span)

    def reset(self) -> None:
        """A new generation: no segment, no switch pending."""
        self._segments = {}
        self._forced = set()
        self._last_call = None

    def call_switches(self) -> bool:
        """At each call: whether this call runs another expert than the call before it (any context), so that what
        the session holds across contexts for the previous expert (CFG-Cache's deltas) is dropped."""
        switched = self._last_call is not None and self._last_call != self.running
        self._last_call = self.running
        return switched

    def enter(self, ctx: Context, config: CacheConfig) -> bool:
        """``ctx`` starts a step (after ``Context.advance``) on the running expert. At a switch (its previous step
        ran another expert): (choice) the previous expert's predictor states are dropped, the schedule's memory is
        released (RCS's input history restarts: ``InputError.release``), and the step will be full (``force``).
        True at a switch."""
        self._forced.discard(ctx.name)
        segments = self._segments.setdefault(ctx.name, [])
        if segments and segments[-1].expert == self.running:
            return False
        segments.append(_Segment(self.running, ctx.step, copy.copy(ctx.counters)))
        if len(segments) == 1:  # the context's first step: it is full by the schedule's own warm-up
            return False
        self._drop_others(ctx)
        config.schedule.release(ctx.schedule.memory)
        self._forced.add(ctx.name)
        return True

    def _drop_others(self, ctx: Context) -> None:
        """Forget every cached module's state that the running expert does not own, and every module's latest record
        step (a full step notes one for every module, the running expert's too): the running expert starts as a
        context does at its first step."""
        mine = self.experts[self.running].span
        for idx, record in ctx.caches.records.items():
            if idx in mine:
                record.last_record.clear()
            else:
                record.clear()

    def force(self, ctx: Context) -> bool:
        """Make ``ctx``'s decided step full where a switch asks for it; True when that changed the decision (the
        caller then prepares the step's rows again)."""
        if ctx.name not in self._forced:
            return False
        self._forced.discard(ctx.name)
        if ctx.schedule.full:
            return False
        ctx.schedule.full = True
        ctx.schedule.full_steps.append(ctx.step)
        return True

    # -- stats --------------------------------------------------------------------------------------------------
    def stats(self, method: str, contexts: dict[str, Context], totals: dict[str, ContextStats],
              modules: dict[str, str], names: list[str], unknown: str | None) -> dict[str, CacheStats]:
        """Each expert's stats over the steps it served: its full steps (on the one step clock), its FLOPs and its
        errors. Cache memory is the running expert's (the others' caches were dropped at the switch); the peaks are
        reported in the total only."""
        out = {}
        for e, expert in enumerate(self.experts):
            own = {names[i] for i in expert.span}
            per = {}
            for name, ctx in contexts.items():
                steps, counters = self._served(ctx, e)
                if steps:
                    per[name] = _restrict(totals[name], steps, counters, own,
                                          self._segments[name][-1].expert == e, unknown)
            kinds = {n: k for n, k in modules.items() if n in own}
            # an expert that completed no step counted no FLOPs: its NaN fields say so (found by review)
            counted = any(p.full_flops > 0 for p in per.values())
            out[expert.name] = combine(method, per, 0, kinds,
                                       unknown or (None if counted else "this expert completed no step"))
        return out

    def _served(self, ctx: Context, e: int) -> tuple[set[int], Counters]:
        """The steps expert ``e`` served in ``ctx`` and the FLOPs it ran there."""
        segments = self._segments.get(ctx.name, [])
        steps: set[int] = set()
        total = Counters()
        for s, seg in enumerate(segments):
            if seg.expert != e:
                continue
            end = segments[s + 1] if s + 1 < len(segments) else None
            steps.update(range(seg.first, end.first if end is not None else ctx.step + 1))
            after = end.counters if end is not None else ctx.counters
            for f in vars(total):
                setattr(total, f, getattr(total, f) + getattr(after, f) - getattr(seg.counters, f))
        return steps, total


def _restrict(st: ContextStats, steps: set[int], c: Counters, own: set[str], running: bool,
              unknown: str | None) -> ContextStats:
    """``st`` (a context's stats over the whole generation) cut to ``steps`` and the modules ``own``."""
    full = [s for s in st.full_steps if s in steps]
    flops: dict[str, Any] = {}
    if unknown is None:
        flops = dict(flops_fraction=fraction(c.executed, c.full), executed_flops=c.executed, full_flops=c.full,
                     model_flops_fraction=fraction(c.model_executed, c.model_full),
                     model_executed_flops=c.model_executed, model_full_flops=c.model_full)
    return replace(
        st, num_steps=len(steps), full_steps=full, nfc=len(full), **flops,
        input_errors={s: e for s, e in st.input_errors.items() if s in steps},
        module_errors={n: {s: e for s, e in errs.items() if s in steps} for n, errs in st.module_errors.items()
                       if n in own},
        uncond_skipped_steps=[s for s in st.uncond_skipped_steps if s in steps],
        nonfinite_samples={s: n for s, n in st.nonfinite_samples.items() if s in steps},
        cache_bytes=st.cache_bytes if running else 0, peak_cache_bytes=0, peak_module_bytes={},
    )


class ExpertCalls:
    """The step hook's host on expert ``index``: says which expert runs, then hands the call to the session."""

    def __init__(self, session: Any, index: int) -> None:
        self.session = session
        self.index = index
        self.adapter = session.adapter
        self.generations = session.generations

    def start_call(self, name: str, step_index: int | None, forward: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any], compiled: bool) -> bool:
        self.session.experts.running = self.index
        return self.session.start_call(name, step_index, forward, args, kwargs, compiled)

    @property
    def probing(self) -> Any:
        return self.session.probing

    @property
    def first_call(self) -> bool:
        return self.session.first_call

    def call_kind(self) -> Hashable:
        return self.session.call_kind()

    def measure(self, forward: Any) -> Any:
        return self.session.measure(forward)

    def settle(self, measured: Any) -> None:
        self.session.settle(measured)

    def run_call(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.session.run_call(forward, args, kwargs)

    def end_call(self) -> None:
        self.session.end_call()

    def rehearse(self) -> bool:
        return self.session.rehearse()

    def end_generation(self) -> None:
        self.session.end_generation()
