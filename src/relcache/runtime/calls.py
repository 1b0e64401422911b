"""The start and end of each transformer call (``StepCalls``, the part of a ``controller.Session`` that the model's step
hook calls; ``hooks.StepHost``): a step's context and decision, CFG-Cache's plan, whether the call runs eagerly, a
compiled RCS step's pre-pass, the rehearsed first call, and what the call counted.

The schedule decides once per step (``steps.py``: at the step's start, or at the first cached module where RCS needs
that module's input), before any expensive module has run; every later module of the step follows the decision.
(choice) On a CFG batch, ``InputError`` (RCS) measures its input error on the conditional half only, the half that
runs at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..methods.history import numbers_on, row_dtype
from .accounting import signature
from .attachment import refuse_diffusers_cache
from .context import Context
from .distributed import check_enable_order
from .rehearsal import first_call_key
from .steps import (
    Probing,
    RowGroups,
    decide,
    end_step,
    kept_rows,
    mark_records,
    prepare_step,
    probe_rows,
    take_decision,
)


class StepCalls:
    """``start_call``, ``run_call``, ``end_call`` and what they need, mixed into ``controller.Session``. They read and
    set the session's ``contexts`` and ``current`` context and its per-call fields (``_call_sig``, ``_compiled_call``,
    ``_completed``, ``_called``, the slots' ``computing``, ``first_call``, ``probing``, ``cfg_peak``), and read its
    ``model``, ``config``, ``adapter``, ``cached_modules``, ``generations``, ``cfg``, ``modulation``, ``experts``,
    ``reducer``, ``shared``, ``meter``, ``budget``, ``static`` and ``static_caches``, ``prober``, ``rehearsals`` and
    ``record_errors``. The session's ``drop_sharing`` runs at every compiled call; its ``_follow_replaced_modules``,
    ``_check_compiled_blocks`` and ``reset_generation`` at a context's first call and at a rehearsal."""

    def start_call(self, name: str, step_index: int | None, forward: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], compiled: bool) -> bool:
        """Start the next step of context ``name``, and a new generation where the rules say so. A schedule that
        needs no input decides here, before the forward; so does RCS when the forward will be compiled, from a
        pre-pass (``steps.Prober``). True when the step must run eagerly: its context has no cache yet, the call's
        shapes are new in this generation (caches are allocated outside compiled code), or errors are recorded."""
        check_enable_order(self.model, self.reducer)
        if compiled:
            self.drop_sharing()
        gens = self.generations
        gens.check_caller()
        timestep = gens.timestep_of(args, kwargs, step_index)
        ctx = self.contexts.get(name)
        if gens.starts_new(None if ctx is None else (ctx.step, ctx.last_timestep), step_index, timestep):
            gens.begin()
            ctx = None
        if ctx is None:
            refuse_diffusers_cache([("transformer", self.model)] if self.experts is None else
                                   [(e.name, e.model) for e in self.experts.experts], after=True)
            if self.reducer is not None:  # every process agrees on the step count before checking its settings
                self.reducer.agree(name, gens.num_steps, self.adapter.hidden_of(args, kwargs))
            self._follow_replaced_modules()
            self._check_compiled_blocks(args, kwargs)
            # may raise ConfigError (e.g. target_nfc > steps): nothing changed yet
            reducer = {} if self.reducer is None else {"reducer": self.reducer}
            with gens.noting_outside():
                ctx = Context(name, self.config.schedule.new_state(gens.num_steps, **reducer))
            if self.static_caches or self.static_caches is None and compiled:
                ctx.static = self.static
            self._storage(ctx, forward, args, kwargs, compiled)  # may raise ConfigError: nothing changed yet
            self.contexts[name] = ctx
        ctx.advance(step_index, timestep)
        if self.experts is not None:  # the running expert's caches; a switch forces the step full
            if self.experts.call_switches() and self.cfg is not None:
                self.cfg.reset()  # CFG-Cache's deltas are the previous expert's
            if self.experts.enter(ctx, self.config) and self.config.max_cache_bytes is not None:
                # the previous expert's caches are gone: the storage is chosen again for this one's modules (a
                # deeper, wider or float64 second expert went over the budget sized from the first)
                self._storage(ctx, forward, args, kwargs, compiled)
        gens.check_step(ctx.step)
        if self.modulation is not None:
            self.modulation.start_call(name, ctx.step, gens.timesteps, args, kwargs,
                                       self.adapter.hidden_of(args, kwargs).dtype)
        self.current = ctx
        self.bind_slots(ctx.caches)
        if self.cfg is not None:

            def decide_now() -> bool:  # asked by CFG-Cache's plan; RCS reads a pre-pass's probe, conditional rows
                probe = None
                if self.config.schedule.uses_input:
                    probe = self.prober.run(forward, args, kwargs)  # the module's rows: batch-major, maybe x frames
                    probe = probe_rows(probe, ctx.cfg.row_groups(probe.shape[0]))
                take_decision(self.config, ctx, probe, self.adapter.hidden_of(args, kwargs), self.reducer,
                              num_steps=self.generations.num_steps)
                self._force_full(ctx)
                return ctx.schedule.full

            with gens.noting_outside():
                self.cfg.plan(ctx, gens.num_steps, args, kwargs, decide_now)
            if ctx.cfg.half_batch and self.modulation is not None:
                self.modulation.end_call()  # the forward gets half the batch, not the rows the table was matched on
        # the shapes the forward gets (half a CFG batch at a half-batch step): new ones run eagerly, once
        self.meter.model = None if self.experts is None else self.experts.running
        sig = self._call_sig = (self.meter.model, signature(*(self.cfg.forward_args(ctx, args, kwargs) if self.cfg
                                                               else (args, kwargs))))
        # a context's first call of a generation, into empty caches: compiled once an earlier one was rehearsed
        empty = not ctx.caches.holds_states()
        first = first_call_key(self.model, ctx, sig, args, kwargs) if not ctx.signatures and empty else None
        # record_errors reads each forecast's error on the host, per module: such runs stay eager (an analysis mode)
        self.first_call = compiled and not self.record_errors and self.rehearsals.valid(first, self.static.epoch)
        eager = self.record_errors or ((sig not in ctx.signatures or empty) and not self.first_call)
        self.rehearsals.pending = first if compiled and eager and self._rehearsable(first) else None
        ctx.signatures.add(sig)
        self._compiled_call = compiled and not eager  # counted at its end: graphs count nothing
        if ctx.cfg.skip_call:  # a split "uncond" call rebuilt from "cond": no module runs, nothing to decide
            self.config.schedule.skipped(ctx.schedule.memory, ctx.step)  # a budget counts it spent
            return eager
        groups = [(name, None) for name in ctx.cfg.group_names()]
        if ctx.schedule.decided:  # CFG-Cache's plan took the decision: the rows for the groups it settled
            prepare_step(self.config, gens.num_steps, len(self.cached_modules), ctx, [n for n, _ in groups],
                         self.adapter.hidden_of(args, kwargs))
        elif not self.config.schedule.uses_input:  # decided before the forward
            self._decide(ctx, self.adapter.hidden_of(args, kwargs), groups)
        elif compiled and not eager:  # RCS from a pre-pass of the forward as this call runs it (half a CFG batch)
            runs = self.cfg.forward_args(ctx, args, kwargs) if self.cfg else (args, kwargs)
            if self.reducer is None:  # traced with the forward: the step's graphs take it (``measure``, ``settle``)
                self.probing = Probing(*runs, self._forecast_row(ctx, self.adapter.hidden_of(args, kwargs)))
            else:  # context parallelism: the measurement's collective stays eager
                probe = self.prober.run(forward, *runs)
                self._decide(ctx, probe, ctx.cfg.row_groups(probe.shape[0]))
        return eager

    def call_kind(self) -> Hashable:
        """The running call's kind as the host knows it before the forward: its context, the shapes the forward gets,
        its row groups, CFG-Cache's plan, where already decided whether the step is full, and with batch modulation
        the step count. Each kind runs under an
        entry frame of its own (``hooks.StepHook``), so that each has dynamo's recompile limit to itself."""
        ctx = self.current
        full = ctx.schedule.full if ctx.schedule.decided else None
        # batch modulation's table has a row per step, read in the graph: a new step count gets frames of its own,
        # else each one recompiled under the same frames until dynamo's limit, past which steps ran eagerly for good
        steps = self.generations.num_steps if self.modulation is not None else None
        return ctx.name, self._call_sig, tuple(ctx.cfg.group_names()), ctx.cfg.store, full, steps

    def _rehearsable(self, first: tuple[Any, ...] | None) -> bool:
        """Whether an eager first call may run again compiled (``rehearse``): not yet rehearsed, its context the
        generation's only one so far (forgetting the generation forgets nothing else), and none of the setups whose
        per-generation state lives outside the context (experts, context parallelism) or that stay eager. A stale
        rehearsal (its buffers made anew since) counts as none."""
        return (first is not None and not self.rehearsals.valid(first, self.static.epoch) and not self.record_errors
                and self.experts is None and self.reducer is None and list(self.contexts) == [first[0]])

    def rehearse(self) -> bool:
        """(choice) A context's first call of a generation records into empty caches, a kind of step of its own. It
        runs eagerly the first time (it reserves the caches' buffers and measures FLOPs), so its graph would first be
        compiled in the second generation, and every generation would pay an eager step. Instead, under compile, the
        first generation's first call runs twice: eagerly, then, with the generation forgotten, compiled exactly as
        every later generation's first call will run; the compiled output is returned. One more full step in the
        first generation (which compiles anyway) for one eager step less in each later one. A first call whose
        rehearsal went stale (``Rehearsals.valid``) is not run again: its eager run made the buffers again, and its
        graph exists, so later generations replay it."""
        first, self.rehearsals.pending = self.rehearsals.pending, None
        if first is None or self.rehearsals.mark(first, self.static.epoch):
            return False
        self.end_call()
        self.reset_generation(rehearsal=True)
        return True

    def _forecast_row(self, ctx: Context, like: torch.Tensor) -> torch.Tensor | None:
        """The schedule's forecast row for this step's probe, on ``like``'s device (held at one address under capture),
        or None when it measures nothing."""
        row = self.config.schedule.forecast_row(ctx.schedule.memory, ctx.step)
        if row is None:
            return None
        dtype = row_dtype(like.dtype)
        host = kept_rows(ctx, "probe row", [row], [row], dtype, like.device)
        if ctx.static is None:
            return numbers_on(host, like.device, dtype)[0]
        return ctx.static.put_numbers((ctx.name, "probe row"), host, like.device, dtype)[0]

    def measure(self, forward: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pending pre-pass of a compiled RCS step and its measurement (traced into the step's first graph)."""
        return self.prober.measure(self.config, self.current, forward, self.probing)

    @torch.compiler.disable
    def settle(self, got: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """The decision of a compiled RCS step from its pre-pass: the step's one host read, between its graphs."""
        probe, measured = got
        self.probing = None
        ctx = self.current
        groups = ctx.cfg.row_groups(probe.shape[0])
        self._decide(ctx, probe, groups, measured)
        history = getattr(ctx.schedule.memory, "history", None)
        if ctx.static is not None and ctx.schedule.full and history is not None:
            # the probe is a graph's output, which the graph's next replay may overwrite, and the next pre-pass reads
            # the history: its tensors go into buffers at stable addresses, made for the rows it keeps (a CFG batch's
            # conditional half, as ``decide`` records): so they keep one shape whether a full step runs the whole
            # batch or its conditional half, and are not made anew at every change
            kept = probe_rows(probe, groups)
            ctx.static.hold_history((ctx.name, "probe"), history, kept, ctx.caches.rows[next(iter(ctx.caches.rows))])

    def _storage(self, ctx: Context, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 compiled: bool) -> None:
        """Set a new context's storage: the config's, or under ``max_cache_bytes`` the most precise that fits."""
        planned = {name: c.planned_bytes for name, c in self.contexts.items()}
        expert = None if self.experts is None else self.experts.running
        # compiled records keep RFE's Gram, but not on a split sequence (``Relational.record``)
        gram = compiled and not self.record_errors and self.reducer is None
        ctx.storage, ctx.planned_bytes = self.budget.choose(ctx.name, planned, self.cached_modules, expert, forward,
                                                            args, kwargs, gram, self.generations.call_kind)

    def _decide(self, ctx: Context, probe_input: torch.Tensor, groups: RowGroups,
                measured: torch.Tensor | None = None) -> None:
        decide(self.config, self.generations.num_steps, len(self.cached_modules), ctx, probe_input, groups,
               self.reducer, measured)
        if self._force_full(ctx):  # the rows of a full step
            prepare_step(self.config, self.generations.num_steps, len(self.cached_modules), ctx,
                         [name for name, _ in groups], probe_input)

    def _force_full(self, ctx: Context) -> bool:
        """The rules that overrule a schedule's cached decision, in one place for both paths a step is decided on
        (``_decide``, and CFG-Cache's plan): an expert switch, and a context with nothing recorded yet (its first
        call comes after the schedule's warm-up: one expert of Wan 2.2 enabled alone, a context whose calls start
        late), where every module computes anyway, so the step is full and counted so (found by review: such a step
        was missing from full_steps and NFC). True when the decision changed."""
        forced = self.experts is not None and self.experts.force(ctx)
        if not ctx.schedule.full and not ctx.caches.holds_states():
            ctx.schedule.full, forced = True, True
            ctx.schedule.full_steps.append(ctx.step)
        return forced

    def run_call(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the transformer for the current step, skipping the unconditional CFG half where CFG-Cache says."""
        if self.cfg is None:
            out = self._run(self.current, forward, args, kwargs)
        else:
            out = self.cfg.call(self.current, forward, args, kwargs)
        self._completed = True
        return out

    def end_call(self) -> None:
        ctx = self.current
        self.probing = None  # a call that raised before its pre-pass leaves none pending
        if ctx is not None and ctx.cfg.skip_call:
            self.meter.count_skipped_call(ctx.counters, ctx.caches.called_shapes(), self._call_sig)
        elif ctx is not None and self._compiled_call and self._completed and not self.meter.counted:
            # a compiled call that returned (one that raised is not counted: what of it ran is unknown), and not one
            # dynamo ran eagerly
            self.meter.count_compiled_call(ctx.counters, ctx.schedule.full, ctx.caches.called_shapes(),
                                           self._call_sig, ctx.cfg.batch_scale)
        elif ctx is not None and self.meter.counted and self._completed and self.meter.unknown is None:
            self.meter.count_unreported(ctx.counters, ctx.schedule.full, ctx.caches.called_shapes(),
                                        ctx.cfg.batch_scale)
        self.meter.reported.clear()
        self._compiled_call = self.meter.counted = self.first_call = False
        if ctx is not None:
            end_step(ctx, self._completed)
            ctx.note_peak(deferred=self.reducer is not None)
        if self.cfg is not None:  # CFG-Cache's deltas and a split "cond" output waiting for its pair
            if ctx is not None:
                self.cfg.state.settle(ctx.step)
            self.cfg_peak = max(self.cfg_peak, self.cfg.state.nbytes)
        if ctx is not None and self._completed and self.generations.last_step_of_pipeline(ctx.step):
            self._free_finished(ctx)
        self._completed = False
        self.current = None
        self._called.clear()
        for group in self.shared:
            group.end_call()
        if self.modulation is not None:
            self.modulation.end_call()

    def _free_finished(self, ctx: Context) -> None:
        """``ctx``'s call of a pipeline call's last step returned: no later call of the generation reads its caches,
        which go now rather than at the call's end, after the VAE's decode (whose memory peak they added to);
        CFG-Cache's deltas go once every context has run its last step (a split "uncond" call still reads "cond"'s
        output). The stats keep the generation's numbers and peaks."""
        ctx.caches.clear_states()
        self.config.schedule.release(ctx.schedule.memory)
        if self.cfg is not None and all(self.generations.last_step_of_pipeline(c.step) for c in self.contexts.values()):
            self.cfg.reset()

    def _run(self, ctx: Context, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.meter.run_call(ctx.counters, ctx.cfg.batch_scale, forward, args, kwargs, self._snapshot)

    def _snapshot(self) -> Callable[[], None]:
        """Save what the running call's modules change (``Context.snapshot``), and return how to put it back: a call
        whose FLOP measurement failed runs again from there (``FlopMeter.run_call``)."""
        ctx = self.current
        undecided = not ctx.schedule.decided  # RCS decides at the first cached module, inside the call
        restore_context = ctx.snapshot()

        def restore() -> None:
            restore_context()  # the record steps as before the call: before a decision taken within it, too
            if undecided and ctx.schedule.decided:  # the decision stands (the call runs again decided)
                mark_records(ctx, len(self.cached_modules))
            self.clear_computing()
            self._called.clear()

        return restore

