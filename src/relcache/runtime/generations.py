"""Every rule of when a generation starts and ends, in one place.

A generation is one sampling run: its steps share caches, a step count and a budget.

* Enabled on a pipeline, the scheduler's ``set_timesteps`` (which every diffusers pipeline calls first) starts a
  new generation and announces its number of steps; ``set_begin_index`` (img2img pipelines skip the first
  timesteps with it) announces the steps that will actually run. A scheduler swapped into the pipeline after
  ``enable`` is noticed at the next transformer call, which then starts a generation.
* Every pipeline that drives the transformer is watched, not only the one ``enable`` was given: at each transformer
  call the calling pipeline is looked up on the Python stack (the nearest frame whose ``self`` holds the model as
  its ``transformer``); a pipeline not watched yet (built from another's components, ``from_pipe``, an img2img
  pipeline sharing a text-to-image pipeline's transformer) is patched like the enabled one, held weakly, and its
  first call starts a generation of the steps its scheduler will run. (``enable`` on a second pipeline of a shared
  transformer with the same config attaches it the same way; another config is refused.)
* The end of a pipeline call ends the generation and frees the caches (the stats stay readable): every pipeline
  calls ``maybe_free_model_hooks`` at the end of ``__call__``, and transformers with diffusers' ``CacheMixin``
  also reset their stateful hooks then (``hooks.StepHook.reset_state``). The next step starts a new generation.
* In a hand-written loop, ``relcache.begin_generation`` starts one. Failing that, a transformer call whose step
  index (diffusers' ``cache_context`` step) is not past its context's, or whose timestep is larger than the
  previous one in the same context, starts one. The timestep rule holds only while no generation has been
  marked (by the scheduler or by ``begin_generation``): after a mark, on every device, only marks and the end of
  a pipeline call start generations. So marked loops never wait for a GPU timestep (reading one is a host sync
  per step), and a marked loop whose timesteps rise (DDIM inversion) is one generation.
* A generation that runs another number of steps than it announced warns once: at the step past the announced
  count, or, when it ran fewer, at its end (the pipeline call's end, the next generation's start, or ``disable``).
  Its schedule (a ``target_nfc`` budget, CFG-Cache's window, the rising weight) was planned for the announced count.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConcurrentUseError, ConfigError, check_int, warn
from ..models.base import Adapter
from .callers import calling_pipeline, says_cfg
from .watching import PipelineWatch, steps_to_run, timesteps_to_run


class GenerationHost(Protocol):
    """What the generation rules ask of the runtime."""

    model: nn.Module

    def reset_generation(self) -> None:
        """Drop every context's state: a new generation starts."""

    def free_caches(self) -> None:
        """Free the cached tensors; keep what the stats read."""

    def steps_run(self) -> tuple[int, int]:
        """(steps run, full steps) of the generation so far, in its context with the most steps; (0, 0) if none."""

    def short_contexts(self) -> list[tuple[str, int, int]]:
        """(name, steps run, full steps) of the call contexts that ran fewer steps than the longest, where that
        matters to the schedule (a ``target_nfc`` budget)."""


#: said where a loop may call the transformer twice per step with different latents (found by review: split CFG in a
#: hand-written loop, each call's input a new tensor, was taken for twice the steps in one context, and announcing
#: twice the steps, as the warning advised, kept the two calls' caches mixed)
_SPLIT_HINT = (" If the loop calls the transformer more than once per step (CFG as two calls) with a different "
               "latents tensor each time, each call is taken for a step of one context and their caches mix: give "
               "the calls the same tensor, or name them with diffusers' model.cache_context(\"cond\") and "
               "(\"uncond\") (docs/spec.md, \"Call context\"); do not announce more steps.")

#: the advice of a pipeline call that ran fewer steps than its scheduler announced: begin_generation, the loop's
#: way, changes nothing there (the pipeline's set_timesteps announces again; found by review)
_PIPELINE_HINT = ("This pipeline runs fewer of its scheduler's timesteps than set_timesteps announced, without saying "
                  "so (set_begin_index): it slices them itself (a video-to-video strength) or skips the last (Sana "
                  "Sprint); relcache.begin_generation does not help inside a pipeline call. Use a schedule that needs "
                  "no step count there (relcache.FORA, relcache.TaylorSeer, relcache.RFC(threshold=...)), or ignore "
                  "this for an interrupted generation.")


def checked_num_steps(num_steps: Any) -> int | None:
    """``num_steps`` as an int >= 1 (numpy and 0-d integer tensors too), or None; floats and bools are refused."""
    return None if num_steps is None else check_int("num_steps", num_steps, 1)


def _as_float(t: Any) -> float | None:
    """The timestep as a number, or None."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class Generations:
    """The generation lifecycle of one enabled model: marks, ends, the step count; the pipelines driving it are
    kept, and their methods patched, by ``watching.PipelineWatch``."""

    def __init__(self, host: GenerationHost, adapter: Adapter) -> None:
        self.host = host
        self.adapter = adapter
        self.num_steps: int | None = None
        self.timesteps: torch.Tensor | None = None  # the current generation's announced timesteps, if known
        self.marked = False  # a generation was marked (scheduler or begin_generation): timesteps stay unread
        self.ended = False  # the last generation ended: the next step starts a new one
        self.guidance: bool | None = None  # whether this call's pipeline says it runs CFG batched (None: unsaid)
        self.loop_guidance: bool | None = None  # the same, said by begin_generation for a hand-written loop
        # what this call's pipeline says of its guidance, (CFG, true CFG as separate calls), None where unsaid: the
        # cache budget expects the call contexts the last generation of the same kind ran
        self.call_kind: tuple[bool | None, bool | None] = (None, None)
        self._announced: int | None = None  # the step count the current generation was planned for
        self._by_loop = False  # the current generation was announced by begin_generation (a hand-written loop)
        self.calling: int | None = None  # the thread inside a transformer call now, if any (``admit``)
        self._depth = 0  # its calls in progress (a call within a call)
        self._lock = threading.RLock()  # admission and ``begin`` are atomic against other threads
        self._checked = True  # the current generation's steps were compared with its announcement
        self._warned_timestep = False  # ``timestep_of`` warned that no new generation can be noticed
        self._warned_short = False  # ``_check_steps`` warned of a call context that ran fewer steps (once)
        self.pipelines = PipelineWatch(host, self._new_schedule, self.end)  # the pipelines driving the model
        self._from_pipeline = False  # the running call was made by a watched pipeline's method (``check_caller``)
        self._in_pipeline_call = False  # the current generation was started by a watched pipeline's call
        self._pipeline_thread: int | None = None  # the thread of that call (``_refuse_if_calling``)
        self._raised = False  # a transformer call of the current generation raised (``call_raised``)

    def begin(self, num_steps: int | None = None, *, marked: bool = False,
              timesteps: torch.Tensor | None = None, by_loop: bool = False) -> None:
        """Start a new generation; ``marked`` when the caller announced it (scheduler or public API), not when
        the runtime noticed it; ``timesteps`` when it announced them too; ``by_loop`` when ``begin_generation``
        did. Without ``num_steps`` the step count is
        unknown, not the previous generation's (found by review: a hand-written loop after a pipeline call planned
        its ``target_nfc`` budget for the pipeline's step count)."""
        with self._lock:
            self._refuse_if_calling()  # before anything is reset: the running call's state stays whole
            if self._in_pipeline_call and not self.ended:
                # the previous generation was a pipeline call that never reached its end: an exception outside the
                # transformer (its callback, the VAE) ended it, and said so; its steps not run are not warned of
                # now, in the next call (found by review: "announced 8 steps but ran 4" came with the next call)
                self._checked = True
            self._check_steps()
            self.ended = False
            self._in_pipeline_call = False  # ``_new_schedule`` sets it for a pipeline's call
            self._raised = False  # a transformer call of this generation raised
            self.marked = self.marked or marked
            self.num_steps = None if num_steps is None else int(num_steps)
            self._by_loop = by_loop
            self.timesteps = timesteps
            self.host.reset_generation()
            self._announced, self._checked = self.num_steps, False

    # -- one call at a time (choice) ---------------------------------------------------------------------------
    # relcache keeps one generation per enabled transformer (its step counter, caches and schedule), so two threads
    # calling it at once mixed them: errors that named other causes, and wrong or NaN images without an error (found
    # by a careful-user review, 2026-12-07). A call, or a generation's start, while another thread is inside a call
    # is refused before it touches anything. Threads taking turns between calls are not told apart from one loop
    # whose steps run in different threads (a thread pool, a streaming generator), which is served.
    def admit(self) -> None:
        """A transformer call starts (before it reads or writes any state): refused while another thread is inside
        one."""
        with self._lock:
            self._refuse_if_calling()
            self.calling = threading.get_ident()
            self._depth += 1

    def release(self) -> None:
        """An admitted transformer call ended."""
        with self._lock:
            self._depth -= 1
            if not self._depth:
                self.calling = None

    def _refuse_if_calling(self) -> None:
        """Refuse a call or a generation's start while another thread is inside a transformer call, or inside the
        pipeline call whose generation has not ended (between its steps: a callback streaming a preview, the
        scheduler's step). The second came from a careful-user review (2026-12-07): a pipeline sharing the
        transformer, called in another thread between two steps, restarted the running generation and freed its
        caches, and the first call's image came out wrong without a word."""
        me = threading.get_ident()
        if self.calling is not None and self.calling != me:
            where = "running a call"
        elif (self._in_pipeline_call and not self.ended and self._pipeline_thread not in (None, me)
              and self._inside_pipeline(self._pipeline_thread)):
            where = "in the middle of a pipeline call's generation"
        else:
            return
        raise ConcurrentUseError(
            f"relcache: this {type(self.host.model).__name__} is {where} in another thread: relcache keeps one "
            "generation at a time per enabled transformer, so two at once would mix their caches and steps. Run the "
            "generations one after another (e.g. a lock around each pipeline call), or give each thread its own "
            "transformer (relcache.disable, copy.deepcopy, relcache.enable on each)")

    def _inside_pipeline(self, thread: int) -> bool:
        """Whether thread ``thread`` is inside a method of a pipeline driving the model now (read from its stack: a
        call that raised outside the transformer, in its callback or the VAE, never reached its end, and its thread
        has left it)."""
        frame = sys._current_frames().get(thread)
        return frame is not None and calling_pipeline(self.host.model, frame) is not None

    def end(self, pipeline: Any = None) -> None:
        """A pipeline call ended: free the cached tensors, keep the stats readable, start anew at the next step.
        ``pipeline`` None (diffusers' ``CacheMixin`` reset, from within the call's ``maybe_free_model_hooks``): the
        pipeline driving the model is looked up on the stack, so that an interrupted call does not warn there."""
        if pipeline is None:
            found = calling_pipeline(self.host.model, sys._getframe(1))
            pipeline = None if found is None else found[0]
        if not getattr(pipeline, "_interrupt", False):  # a call stopped through ``pipe._interrupt`` ran fewer steps
            self._check_steps()
        self._checked = True
        self.host.free_caches()
        self.ended = True

    def last_step_of_pipeline(self, step: int) -> bool:
        """Whether a context's call of ``step`` was the last of a pipeline call's generation: its caches can go now,
        before the rest of the call (the VAE's decode, whose memory peak they would add to); a
        hand-written loop keeps them (it may go on past its announced count)."""
        return self._in_pipeline_call and not self.ended and self.num_steps is not None and step == self.num_steps - 1

    def outside_note(self) -> str:
        """For a refusal of a call without a step count: where the call came from outside the calls of the pipeline
        ``enable`` was given (a warm-up call of ``pipe.transformer``), what to do instead (found by review: the
        refusal advised enabling on the pipeline, which the user had done, or ``begin_generation``, whose count then
        did not match the next pipeline call's)."""
        if self.num_steps is not None or self._from_pipeline or not self.explicit_pipelines():
            return ""
        return (". This call came from outside the enabled pipeline's calls (a warm-up call of pipe.transformer?): "
                "warm up before relcache.enable, or through the pipeline itself")

    @contextlib.contextmanager
    def noting_outside(self) -> Iterator[None]:
        """A ``ConfigError`` raised inside gets ``outside_note`` appended: a refusal at a context's first call."""
        try:
            yield
        except ConfigError as err:
            raise ConfigError(f"{err}{self.outside_note()}") from None

    def call_raised(self) -> None:
        """A transformer call raised. Made by a pipeline's method, the exception ends that pipeline call, whose end
        (``maybe_free_model_hooks``) then never runs: the generation ends now, its caches freed, its stats kept
        (found by review: an out-of-memory error left the caches held until the next generation or ``disable``,
        just where a user retries). A hand-written loop may go on with its next step: its caches stay."""
        self._raised = True  # a short run after it is the exception's doing: not warned of (``_check_steps``)
        if self._from_pipeline and not self.ended:
            self._from_pipeline = False
            self._checked = True  # no warning of steps not run: the exception says why
            self.host.free_caches()
            self.ended = True

    def _check_steps(self) -> None:
        """Warn once per generation when it ran another number of steps than announced (and ran any)."""
        if self._checked:
            return
        self._checked = True
        announced = self._announced
        run, full = self.host.steps_run()
        if announced is not None and run == announced:
            self._check_contexts(run)
        if announced is None or run == 0 or run == announced or (self._raised and run < announced):
            # (a call that raised stopped the loop, Ctrl-C say: the exception said why; found by review, the warning
            # came first and advised announcing the step count)
            return
        advice = (_PIPELINE_HINT if self._in_pipeline_call else
                  "Announce the number of transformer calls per context the loop makes (relcache.begin_generation("
                  "model, num_steps)), or ignore this for an interrupted generation.")
        # (only fewer steps than announced reach here: one past the count was warned by ``check_step``, with the
        # split-CFG hint, as a loop calling twice per step runs more calls, not fewer)
        warn(
            f"relcache: a generation announced {announced} steps (by the scheduler or begin_generation) but ran "
            f"{run} ({full} of them full); its schedule (a target_nfc budget, CFG-Cache's window) was planned for "
            f"{announced}. {advice}", RuntimeWarning)

    def _check_contexts(self, run: int) -> None:
        """A generation that ran its announced steps, in which a call context ran fewer (a pipeline that stops its
        unconditional calls part-way, as Lumina2's ``cfg_trunc_ratio``, or starts them late): warn once per
        ``enable``, as its ``target_nfc`` budget, planned for every step, gave it fewer full steps (found by review:
        the budget is said to hold in each context)."""
        short = [] if self._warned_short else self.host.short_contexts()
        if not short:
            return
        self._warned_short = True
        said = ", ".join(f"{name!r} ran {steps} ({full} of them full)" for name, steps, full in short)
        warn(f"relcache: of this generation's {run} steps, call context {said}: the pipeline stopped or started its "
             f"calls part-way (e.g. Lumina2's cfg_trunc_ratio), and the context's target_nfc budget, planned for all "
             f"{run} steps, gave it fewer full steps than the others; relcache.stats(...).contexts shows each. Said "
             "once per enable.", RuntimeWarning)

    def check_step(self, step: int) -> None:
        """A context starts ``step``: one past the announced count warns now (once per generation), as the schedule
        (a target NFC's budget, CFG-Cache's window) runs outside what it planned."""
        if self._checked or self._announced is None or step < self._announced:
            return
        self._checked = True
        warn(
            f"relcache: a generation announced {self._announced} steps (by the scheduler or begin_generation) but "
            f"runs step {step + 1}; its schedule (a target_nfc budget, CFG-Cache's window) was planned for "
            f"{self._announced}. Announce the number of transformer calls per context the loop makes "
            f"(relcache.begin_generation(model, num_steps)).{_SPLIT_HINT}",
            RuntimeWarning)

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any], step_index: int | None = None
                    ) -> float | None:
        """The call's timestep while no generation was marked, else None: once marked it is not read on any device
        (on an accelerator reading it is a host sync; a device-dependent rule would make a marked loop behave
        differently on CPU and GPU). Warns once where neither it nor a step index (``step_index``, diffusers' cache
        context's) can tell a new generation: the next would silently continue this one's caches (found by review,
        a CustomAdapter whose ``timestep`` named no argument)."""
        if self.marked:
            return None
        timestep = _as_float(self.adapter.timestep_of(args, kwargs))
        if timestep is None and step_index is None and not self._warned_timestep:
            self._warned_timestep = True
            warn(
                f"relcache: this {type(self.host.model).__name__} call carries no timestep relcache can read (the "
                f"adapter's timestep_of gave None) and no generation was announced, so a new generation in this loop "
                "cannot be noticed and would continue the previous one's caches: call "
                "relcache.begin_generation(model, num_steps) before each generation (or name where the forward gets "
                "its timestep, CustomAdapter(timestep=...))", RuntimeWarning)
        return timestep

    def starts_new(self, last: tuple[int, float | None] | None, step_index: int | None,
                   timestep: float | None) -> bool:
        """Whether a call starts a new generation; ``last`` is its context's (step, timestep) so far, if any."""
        if self.ended:
            return True
        if last is None:
            return False
        step, last_timestep = last
        return (step_index is not None and step_index <= step) or (
            timestep is not None and last_timestep is not None and timestep > last_timestep
        )

    # -- the pipelines' announcements --------------------------------------------------------------------------
    def watch(self, pipeline: Any, *, explicit: bool = True) -> None:
        """Patch ``pipeline`` so that its scheduler starts generations and the end of its call ends them;
        ``explicit`` (``enable`` was given it) holds it strongly, else weakly (found driving the model)."""
        self.pipelines.watch(pipeline, explicit=explicit)

    def watches(self, pipeline: Any, *, explicit: bool = False) -> bool:
        """Whether ``pipeline`` is watched (``explicit``: because ``enable`` was given it)."""
        return self.pipelines.watches(pipeline, explicit=explicit)

    def check_caller(self) -> None:
        """At each transformer call: find the pipeline driving it; one not watched yet is watched from now on, and
        this call starts its generation (its scheduler set its timesteps unpatched). A scheduler swapped into a
        watched pipeline since (``pipe.scheduler = ...from_config(...)``) did the same, so this call starts its
        generation too. Not where ``begin_generation`` announced one that has run no step: an object holding the
        model and a scheduler may be the user's own sampler, whose scheduler gives only noise levels (found by
        review: a class's ``begin_generation(m, 10)`` became a generation of its scheduler's 1000 timesteps). Also
        reads whether the pipeline says it runs CFG (``guidance``)."""
        found = calling_pipeline(self.host.model, sys._getframe(1))
        self._from_pipeline = found is not None
        if found is None:  # a hand-written loop, or a call from outside a pipeline method
            self.guidance = self.loop_guidance
            self.call_kind = (self.loop_guidance, None)
            self.pipelines.check_swaps()
            return
        pipeline, local = found
        said = says_cfg(pipeline, local)  # an object that says nothing (a user's wrapper) leaves the loop's word
        self.guidance = self.loop_guidance if said is None else said
        true_cfg = local.get("do_true_cfg")
        self.call_kind = (self.guidance, true_cfg if isinstance(true_cfg, bool) else None)
        watched = self.pipelines.find(pipeline)
        if watched is None:
            self.pipelines.watch(pipeline, explicit=False)
            if not (self._by_loop and self.host.steps_run() == (0, 0)):  # begin_generation's word, unspent, wins
                self._new_schedule(getattr(pipeline, "scheduler", None))
        else:
            self.pipelines.check_swap(watched)

    def unwatch(self) -> None:
        """Remove every patch, leaving the pipelines and their schedulers as they were; the generation running
        now ends."""
        self._check_steps()
        self.pipelines.unwatch_all()

    def unwatch_pipeline(self, pipeline: Any) -> None:
        """Stop watching ``pipeline`` alone (its scheduler's patches go unless another watched pipeline shares it)."""
        self.pipelines.unwatch(pipeline)

    def explicit_pipelines(self) -> list[Any]:
        """The pipelines ``enable`` was given (held strongly)."""
        return self.pipelines.explicit()

    def _new_schedule(self, scheduler: Any) -> None:
        """A watched scheduler set its timesteps: a generation of the steps it will run starts. Not where
        ``begin_generation`` announced a count no step has spent yet and no watched pipeline is calling: a
        hand-written loop (img2img-like, or reading noise levels) that sets 50 timesteps to run 20 of them planned its
        ``target_nfc`` budget for 50 without a word (found by review). A watched pipeline's call starts its own."""
        found = calling_pipeline(self.host.model, sys._getframe(1))
        by_pipeline = found is not None and self.pipelines.find(found[0]) is not None
        if self._by_loop and self._announced is not None and self.host.steps_run() == (0, 0) and not by_pipeline:
            return
        self.begin(steps_to_run(scheduler), marked=True, timesteps=timesteps_to_run(scheduler))
        self._in_pipeline_call = by_pipeline
        self._pipeline_thread = threading.get_ident() if by_pipeline else None
