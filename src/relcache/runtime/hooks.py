"""The hooks relcache registers on diffusers' hook registry (``attachment`` attaches and detaches them).

One hook on the transformer marks the start and end of each call (a step of one call context) and reads the call
context diffusers' ``cache_context`` sets; one hook per cached module hands the call to the runtime, which returns
the module's real output or its forecast. The hooks know the runtime only through the protocols below.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Hashable
from typing import Any, Protocol

import torch
from diffusers.hooks.hooks import ModelHook, StateManager
from torch import nn

from ..errors import ConfigError
from ..models.base import Adapter
from .attachment import DirectHook
from .uncontexted import UncontextedCalls

STEP_HOOK = "relcache_step"
MODULE_HOOK = "relcache_module"
SHARED_HOOK = "relcache_shared"
MODULATION_HOOK = "relcache_modulation"
SOURCE_HOOK = "relcache_modulation_source"


class StepHost(Protocol):
    """What the transformer's hook asks of the runtime."""

    adapter: Adapter
    #: the generation lifecycle; its ``admit`` and ``release`` bracket every call (one thread at a time)
    generations: Any

    def start_call(self, name: str, step_index: int | None, forward: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any], compiled: bool) -> bool:
        """A transformer call starts in context ``name`` (diffusers' cache context step, if it gives one), its forward
        about to be compiled when ``compiled``; True when the step must run eagerly (it allocates caches)."""

    #: a compiled RCS step's pre-pass, pending until ``measure`` (None for other steps)
    probing: Any
    #: the running call is a context's first of a generation, compiled (``rehearse``): it runs under an entry frame
    #: of its own, so that its graph does not count against the other steps' recompile limit
    first_call: bool

    def call_kind(self) -> Hashable:
        """The kind of the running call, as far as the host knows it before the forward (its context, shapes, row
        groups and plan): each kind runs under an entry frame of its own (``StepHook``)."""

    def measure(self, forward: Any) -> Any:
        """The pending pre-pass and the schedule's measurement of it: tensors only (traced)."""

    def settle(self, measured: Any) -> None:
        """The step's decision from ``measure``'s result, on the host (compiler-disabled)."""

    def run_call(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the transformer for the current step."""

    def end_call(self) -> None:
        """The transformer call returned or raised."""

    def rehearse(self) -> bool:
        """After an eager call: True when it was a context's first call under ``torch.compile`` whose compiled form
        has not run yet. The call is then ended and the generation so far forgotten, so that it runs again compiled
        (``start_call`` again): every later generation's first call replays that graph instead of running eagerly."""

    def end_generation(self) -> None:
        """diffusers reset the stateful hooks: the pipeline call ended."""


class ModuleHost(Protocol):
    """What a cached module's hook asks of the runtime."""

    def module_forward(self, slot: Any, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The output of ``slot``'s module (``modules.ModuleSlot``) at this step: computed (``original``) or
        forecast."""


class _NoState:
    """Placeholder state so diffusers' ``cache_context`` can set a context on our hook."""

    def reset(self) -> None:
        pass


def _under_compile() -> bool:
    """Whether dynamo will compile what this (skipped) frame calls: torch.compile is active around it. Reads dynamo's
    frame callback (a private API; where it is missing, relcache behaves as if not compiled)."""
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
    except ImportError:  # pragma: no cover - other torch versions
        return False
    return get_eval_frame_callback() not in (None, False)


def _enter(host: StepHost, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The step as dynamo compiles it: a compiled RCS step's pre-pass and measurement, then its one host read (the
    decision, a graph break), then the forward; any other step, the forward alone."""
    if host.probing is not None:
        host.settle(host.measure(forward))
    return host.run_call(forward, args, kwargs)


_entries = itertools.count()


def _own_entry() -> Any:
    """A copy of ``_enter`` with a code object of its own. dynamo keeps compiled graphs, and counts them against its
    recompile limit (8), per code object: the frame it compiles under the step hook is this entry, so each enabled
    transformer (each Wan 2.2 expert too) gets its own graphs and limit instead of sharing one with every other."""
    code = _enter.__code__.replace(co_name=f"relcache_step_{next(_entries)}")
    return types.FunctionType(code, _enter.__globals__, code.co_name)


def _skip_frame_in_c(fn: Any) -> None:
    """(choice) Have dynamo skip ``fn``'s frames without calling back into Python, still compiling what they call.
    dynamo skips a frame disabled with ``recursive=False`` anew at every call: it does not record the skip on the
    code, so its frame callback runs in Python each time (a trace-rules check and a disassembly of the code): 0.34-0.36
    ms of a 2.0-2.5 ms compiled step on a tiny DiT (2026-12-05, ``benchmarks/step_host.py``). ``fn`` runs only through
    that wrapper, so the skip goes on its code: what the wrapper does (one frame skipped, its callees compiled) at no
    per-call cost. A private dynamo API: where it is missing, nothing changes."""
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # pragma: no cover - other torch versions
        return
    skip_code(fn.__code__)


@torch.compiler.disable
def _eagerly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn`` run without compiling anything it calls (a step that allocates caches)."""
    return fn(*args, **kwargs)


def _latents(adapter: Adapter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call's latents, or None where the adapter finds none."""
    try:
        return adapter.hidden_of(args, kwargs)
    except (TypeError, KeyError, IndexError):
        return None


def _records(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether autograd records a call (grad mode on): some tensor argument or parameter needs a gradient."""
    tensors = (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


#: why a call with gradient checkpointing on is refused (diffusers checkpoints only where autograd records)
CHECKPOINTING_REASON = (
    "relcache cannot serve a transformer with gradient checkpointing on while autograd records: the backward pass "
    "runs the blocks again after the call, and the cached modules would compute there what the forward predicted, "
    "so gradients would be wrong (or torch's checkpoint check fails). Call model.disable_gradient_checkpointing(), "
    "or run under torch.no_grad()")


#: why a whole-model ``torch.compile(..., fullgraph=True)`` of a model relcache is enabled on fails at its first call
FULLGRAPH_REASON = (
    "relcache settles each step's schedule on the host before the transformer's forward, which is compiled as a "
    "frame of its own: compile the model without fullgraph=True, torch.compile(model) (each kind of step then runs "
    "as whole graphs, docs/performance.md)")


class StepHook(ModelHook):
    """On the transformer: marks the start of a step in the current call context and runs the call.

    Under ``torch.compile`` this hook's own frame is skipped (``torch._dynamo.disable(recursive=False)``) and its
    bookkeeping runs in compiler-disabled calls, so the step's schedule decision and per-step numbers are settled on
    the host before the transformer's forward, which dynamo then compiles as a frame of its own: one graph per kind of
    step, read from a Python bool and tensors, never from step numbers.
    """

    _is_stateful = True

    def __init__(self, host: StepHost) -> None:
        super().__init__()
        self.host = host
        self.cache_context = StateManager(_NoState)  # diffusers' model.cache_context(...) sets it
        # the registry calls new_forward; the reason is what torch.compile(..., fullgraph=True) reports
        self.new_forward = torch._dynamo.disable(self._step, recursive=False, reason=FULLGRAPH_REASON)
        _skip_frame_in_c(StepHook._step)
        # the frames dynamo compiles: this model's own, one per kind of call (``StepHost.call_kind``; compiled first
        # calls apart). dynamo counts graphs against its recompile limit (8) per frame, and the graphs of one frame
        # are the kinds of step times the shapes and row groups seen: a second batch size, or guidance switched
        # off, would pass 8 and run the rest eagerly in every later generation
        self._entries: dict[tuple[bool, Hashable] | None, Any] = {}
        self._uncontexted = UncontextedCalls()

    def release(self) -> None:
        """Drop what the hook holds between calls (the last latents and timestep, the compiled entry frames): it
        refers to itself through ``new_forward``, so once removed it lives on until the cycle collector runs."""
        self._uncontexted.forget()
        self._entries.clear()

    def _step(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if self.host.adapter.extra_call(args, kwargs):  # the plain model: no step, no cache, no FLOPs counted
            return forward(*args, **kwargs)
        checkpointing = getattr(module, "gradient_checkpointing", False)
        if checkpointing and torch.is_grad_enabled() and _records(module, args, kwargs):
            raise ConfigError(CHECKPOINTING_REASON)
        self._admit()  # refused while another thread is in a call, before anything is read or written
        raised = False
        try:  # a start that raises ends the call too: nothing of it stays current
            compiled = _under_compile()
            name, step_index = self._context(args, kwargs)
            if self._start(name, step_index, forward, args, kwargs, compiled):
                out = _eagerly(self.host.run_call, forward, args, kwargs)
                if not self._rehearse():
                    return out
                # the first call again, compiled (its eager run reserved the caches and measured the FLOPs)
                if self._start(name, step_index, forward, args, kwargs, compiled):  # pragma: no cover - a bug
                    raise RuntimeError("relcache: a rehearsed first call was asked to run eagerly again")
            kind = (self.host.first_call, self.host.call_kind()) if compiled else None  # eager: any entry will do
            enter = self._entries.get(kind)
            if enter is None:
                enter = self._entries[kind] = _own_entry()
            return enter(self.host, forward, args, kwargs)
        except BaseException:
            self._uncontexted.forget()  # a call that raised: the next one (a retry) starts its step afresh
            raised = True
            raise
        finally:
            try:
                self._end()
                if raised:  # after the call's end: a pipeline's call ends with it, and frees its caches
                    self._raised()
            finally:
                self._release()

    @torch.compiler.disable
    def _raised(self) -> None:
        self.host.generations.call_raised()

    @torch.compiler.disable
    def _admit(self) -> None:
        self.host.generations.admit()

    @torch.compiler.disable
    def _release(self) -> None:
        self.host.generations.release()

    @torch.compiler.disable
    def _context(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, int | None]:
        """The call's context name and step index: diffusers' cache context's, else ``UncontextedCalls``'."""
        context = self.cache_context._context
        if context is not None:
            return context.name, getattr(context, "step_index", None)
        return self._uncontexted.name(_latents(self.host.adapter, args, kwargs),
                                      self.host.adapter.timestep_of(args, kwargs)), None

    @torch.compiler.disable
    def _start(self, name: str, step_index: int | None, forward: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any], compiled: bool) -> bool:
        return self.host.start_call(name, step_index, forward, args, kwargs, compiled)

    @torch.compiler.disable
    def _rehearse(self) -> bool:
        return self.host.rehearse()

    @torch.compiler.disable
    def _end(self) -> None:
        self.host.end_call()

    def forget_calls(self) -> None:
        """The next call without a cache context starts a step (``begin_generation``: a loop that begins with the
        latents and timestep the previous generation ended on would otherwise be read as that step's second call)."""
        self._uncontexted.forget()

    def reset_state(self, module: nn.Module) -> nn.Module:
        self._uncontexted.forget()
        self.host.end_generation()
        return module


class ModuleHook(DirectHook):
    """On a cached module: full computation or prediction, as the runtime decides."""

    def __init__(self, host: ModuleHost, slot: Any) -> None:
        super().__init__()
        self.host = host
        self.slot = slot  # the module's ``modules.ModuleSlot``: its state, reached without its index

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.direct_forward(*args, **kwargs)

    def direct_forward(self, *args: Any, **kwargs: Any) -> Any:
        # the module is not read (not even to pass it on): each object compiled code reads is guarded
        return self.host.module_forward(self.slot, self.fn_ref.original_forward, args, kwargs)
