"""The runtime: attaches a ``CacheConfig`` to a model and runs it.

It uses diffusers' hook registry: one hook on the transformer marks the start of each step and reads the
call context, and one hook per cached module returns either the module's real output (full step, recorded
by the predictor) or the predictor's forecast (cached step). The schedule decides once per step, when the
first cached module is reached.

Generations and steps:

* Enabled on a pipeline, the scheduler's ``set_timesteps`` (which every diffusers pipeline calls first)
  starts a new generation and announces its number of steps; ``set_begin_index`` (img2img pipelines skip the
  first timesteps with it) announces the steps that will actually run. A scheduler swapped into the pipeline
  after ``enable`` is noticed at the next transformer call, which then starts a generation. The pipeline's
  ``maybe_free_model_hooks``, which every pipeline calls at the end of ``__call__``, ends the generation and
  frees the caches.
* In a hand-written loop, call :func:`begin_generation` before the loop. Failing that, a timestep larger
  than the previous one in the same context also starts a new generation. This rule holds only while no
  generation has been marked, by the scheduler or by :func:`begin_generation`: after a mark, on every device,
  only marks (and the end of a pipeline call) start generations. So marked loops never wait for a GPU
  timestep (reading one is a host sync per step), and a marked loop whose timesteps rise (DDIM inversion)
  is one generation.
* The step index is the number of transformer calls in the current context, or the ``step_index`` of a
  diffusers ``cache_context`` when the pipeline passes one.
* Each call context keeps its own state. The context is diffusers' ``cache_context`` name (pipelines that
  run CFG as separate cond and uncond calls set it) or ``"default"``.

CFG-Cache (``CacheConfig.cfg_cache``), the unconditional half of classifier-free guidance skipped and rebuilt:

* CFG batched (one call whose batch is ``[cond; uncond]`` or ``[uncond; cond]``, any context name other than
  "cond"/"uncond"): a call is a CFG batch when its batch is even and the two halves of its ``hidden_states`` are
  equal, as every diffusers pipeline makes them (``torch.cat([latents] * 2)``); this is checked once, at a context's
  first call of a generation. (choice) A later call with another batch size (guidance stopped within the
  generation) is a plain call: no half is skipped; a call of half the batch (guidance dropped) continues the
  conditional half's module states, any other batch keeps one state for the whole batch. Anything
  else (guidance scale 1, or a batch of different latents) leaves CFG-Cache inert, exactly the config without it.
  At a step that skips the unconditional half, every tensor argument whose first dimension is the batch
  (top-level, or one level down in a dict argument; never tuples, ``img_ids`` or ``txt_ids``) is sliced to the
  conditional half, the transformer runs on it, and the full-batch output is reassembled in the original order
  with the rebuilt unconditional half.
* CFG split (contexts named "cond" and "uncond"): a skipped "uncond" call does not run the transformer; it returns
  the rebuild from the same step's "cond" output, so the "cond" call must come first (diffusers' pipelines do;
  otherwise the "uncond" call runs). The "uncond" context's module schedule is not consulted at a skipped call: the
  step is neither full nor cached there, and its module caches forecast from its own latest full step.
* Module caches stay per sample on a CFG batch: each cached module's predictor state is kept per half (the
  module's leading dimension is batch-major, so a half of the model batch is a half of its rows), a full-batch step
  records and predicts both halves, a half-batch step only the conditional one. (choice) ``InputError`` (RCS)
  measures its input error on the conditional half only, the half that runs at every step.
* FLOPs: ``flops_fraction`` is over the cached modules as before; a half-batch step counts what ran against the
  full batch, so a step computing every module on half the batch counts half. ``model_flops_fraction`` is over the
  whole transformer: the FLOPs outside the cached modules are measured once per input shape (the first call that
  runs with it) and counted at every call in proportion to the rows that ran; a skipped split "uncond" call counts
  nothing against a full call. The FFT rebuild is not counted (a few FLOPs per output element).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
from torch import nn

from .flops import flop_counter
from .methods.cfg_cache import CFGCache
from .methods.config import CacheConfig
from .methods.history import relative_l1
from .methods.predictors import PredictorState
from .models.base import Adapter, CachedModule, SpatialGrid, first_tensor_input
from .shared import SharedGroup, SharedHook

_ATTR = "_relcache"
_STEP_HOOK = "relcache_step"
_MODULE_HOOK = "relcache_module"
_SHARED_HOOK = "relcache_shared"
DEFAULT_CONTEXT = "default"
SPLIT_CONTEXTS = ("cond", "uncond")  # CFG as separate calls, named by diffusers' cache_context
_UNBATCHED_KWARGS = frozenset({"img_ids", "txt_ids"})  # position ids whose first dim is not the batch
_NAN = float("nan")


@dataclass(frozen=True)
class ContextStats:
    """What one call context (e.g. "cond" or "uncond") did in the last generation."""

    name: str
    num_steps: int
    full_steps: list[int]
    nfc: int
    flops_fraction: float
    executed_flops: float  # FLOPs of the cached modules that actually ran
    full_flops: float  # FLOPs those modules would have run with full computation
    input_errors: dict[int, float] = field(default_factory=dict)  # RCS e(i), InputError schedules only
    module_errors: dict[str, dict[int, float]] = field(default_factory=dict)  # record_errors=True only
    uncond_skipped_steps: list[int] = field(default_factory=list)  # CFG-Cache: steps without the uncond half
    model_flops_fraction: float = _NAN  # whole transformer: executed / full computation
    model_executed_flops: float = 0.0
    model_full_flops: float = 0.0
    cache_bytes: int = 0  # bytes the predictors and the schedule hold at the end of the generation

    @property
    def uncond_skipped(self) -> int:
        """How many unconditional halves (or "uncond" calls) CFG-Cache skipped."""
        return len(self.uncond_skipped_steps)


@dataclass(frozen=True)
class CacheStats:
    """What caching did in the last generation.

    With one context (CFG batched, or no CFG) the top-level fields are that context's. With several
    (CFG split into calls), ``full_steps`` is the union of their full steps, ``nfc`` its length,
    ``num_steps`` the largest, and ``flops_fraction`` pools the FLOPs of all contexts.

    ``flops_fraction`` covers the cached modules, ``model_flops_fraction`` the whole transformer (the modules that
    are never cached, embeddings and final layer included); a step that ran half the batch counts half.
    ``uncond_skipped`` counts the unconditional halves CFG-Cache skipped, over all contexts.
    ``cache_bytes`` is the memory the caches hold at the end of the generation (predictor states, RCS input
    history and CFG-Cache deltas, over all contexts).
    """

    method: str
    nfc: int
    num_steps: int
    full_steps: list[int]
    flops_fraction: float
    contexts: dict[str, ContextStats]
    model_flops_fraction: float = _NAN
    uncond_skipped: int = 0
    cache_bytes: int = 0


class _NoState:
    """Placeholder state so diffusers' ``cache_context`` can set a context on our hook."""

    def reset(self) -> None:
        pass


class _Context:
    """Per-context, per-generation state."""

    def __init__(self, name: str, ctrl: _Controller) -> None:
        self.name = name
        self.schedule_state = ctrl.config.schedule.new_state(ctrl.num_steps)
        self.step = -1
        self.last_timestep: float | None = None
        self.decided = False
        self.full = True
        self.full_steps: list[int] = []
        # predictor states and input shapes per (module, part): part "all" is the whole batch; on a CFG batch
        # with CFG-Cache the parts are the "cond" and "uncond" halves, kept apart so a half-batch step can run
        self.states: dict[tuple[int, str], list[PredictorState]] = {}
        self.shapes: dict[tuple[int, str], tuple[tuple[int, ...], ...]] = {}
        self.call_shapes: dict[int, tuple[tuple[int, ...], ...]] = {}  # each module's last whole-call input shapes
        self.tuple_out: dict[int, bool] = {}  # whether each module returns a tuple of tensors
        self.executed_flops = 0.0
        self.full_flops = 0.0
        self.model_executed_flops = 0.0
        self.model_full_flops = 0.0
        self.module_errors: dict[int, dict[int, float]] = {}
        self.cfg_batch: bool | None = None  # CFG-Cache on a CFG batch (decided at the first call)
        self.cfg_rows = 0  # the batch size of that first call
        self.plain: str | None = None  # a call whose batch is not the CFG batch: its one part ("cond" or "all")
        self.cond_first = False
        self.half = False  # this step runs only the conditional half of a CFG batch
        self.uncond_skipped: list[int] = []

    @property
    def batch_scale(self) -> int:
        """Full-batch rows per row that runs now: 2 at a half-batch step."""
        return 2 if self.half else 1

    def parts(self, rows: int) -> list[tuple[str, slice | None]]:
        """The row groups of a cached module's ``rows``-row batch that keep separate predictor states."""
        if not self.cfg_batch:
            return [("all", None)]
        if self.plain is not None:
            return [(self.plain, None)]
        if self.half:
            return [("cond", None)]
        if rows % 2:
            raise RuntimeError(f"CFG-Cache: a cached module's batch of {rows} rows does not split in two halves")
        first, second = slice(0, rows // 2), slice(rows // 2, rows)
        return [("cond", first), ("uncond", second)] if self.cond_first else [("uncond", first), ("cond", second)]

    def stats(self, modules: list[CachedModule]) -> ContextStats:
        errors = getattr(self.schedule_state, "errors", None) or {}
        return ContextStats(
            name=self.name,
            num_steps=self.step + 1,
            full_steps=list(self.full_steps),
            nfc=len(self.full_steps),
            flops_fraction=_fraction(self.executed_flops, self.full_flops),
            executed_flops=self.executed_flops,
            full_flops=self.full_flops,
            input_errors=dict(errors),
            module_errors={modules[i].name: dict(e) for i, e in self.module_errors.items()},
            uncond_skipped_steps=list(self.uncond_skipped),
            model_flops_fraction=_fraction(self.model_executed_flops, self.model_full_flops),
            model_executed_flops=self.model_executed_flops,
            model_full_flops=self.model_full_flops,
            cache_bytes=self.cache_bytes(),
        )

    def cache_bytes(self) -> int:
        """Bytes held by this context's predictor states and its schedule's input history."""
        history = getattr(self.schedule_state, "history", None)
        held = sum(st.nbytes for states in self.states.values() for st in states)
        return held + (history.nbytes if history is not None else 0)


class _CFGState:
    """CFG-Cache memory of one generation, shared by the contexts (split CFG pairs "cond" with "uncond")."""

    def __init__(self) -> None:
        self.delta: tuple[torch.Tensor, torch.Tensor] | None = None  # (ΔLF, ΔHF) of the latest step with both
        self.delta_shape: tuple[int, ...] | None = None  # input shape of the conditional half it belongs to
        self.scale = (1.0, 1.0)  # compound mode: the weights multiplied up since the delta was stored
        self.cond: tuple[int, Any, tuple[int, ...]] | None = None  # split: (step, output, input shape) of "cond"

    def store(self, cfg: CFGCache, uncond: torch.Tensor, cond: torch.Tensor, shape: tuple[int, ...],
              grid: SpatialGrid | None = None) -> None:
        """Keep ``(ΔLF, ΔHF)``; ``grid`` puts token outputs in image layout first (``Adapter.spatial_grid``)."""
        if grid is not None:
            uncond, cond = grid[0](uncond), grid[0](cond)
        self.delta = cfg.deltas(uncond, cond)
        self.delta_shape = shape
        self.scale = (1.0, 1.0)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored deltas and of a split-CFG conditional output waiting for its pair."""
        held = list(self.delta or ())
        if self.cond is not None and isinstance(self.cond[1], torch.Tensor):
            held.append(self.cond[1])
        return sum(t.numel() * t.element_size() for t in held)

    def usable(self, shape: tuple[int, ...]) -> bool:
        return self.delta is not None and self.delta_shape == shape

    def rebuild(self, cfg: CFGCache, cond: torch.Tensor, step: int, num_steps: int,
                grid: SpatialGrid | None = None) -> torch.Tensor:
        """The unconditional output rebuilt from ``cond``; (choice) weights apply afresh unless ``compound``."""
        w1, w2 = cfg.weights(step, num_steps)
        if cfg.compound:
            w1, w2 = self.scale = (self.scale[0] * w1, self.scale[1] * w2)
        if grid is None:
            return cfg.rebuild(cond, *self.delta, w1, w2)
        return grid[1](cfg.rebuild(grid[0](cond), *self.delta, w1, w2))


def _take(x: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return x if rows is None else x[rows]


class _Part(NamedTuple):
    """One row group of a cached module's call: its name, rows (None = all), inputs and their shapes."""

    name: str
    rows: slice | None
    inps: tuple[torch.Tensor, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def cut(cls, name: str, rows: slice, inps: tuple[torch.Tensor, ...]) -> _Part:
        xs = tuple(x[rows] for x in inps)
        return cls(name, rows, xs, tuple(tuple(x.shape) for x in xs))


def _sample_of(out: Any) -> torch.Tensor:
    """The sample tensor of a transformer output (a tensor, a tuple, or a diffusers output dataclass)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    if dataclasses.is_dataclass(out):
        return getattr(out, dataclasses.fields(out)[0].name)
    raise TypeError(f"CFG-Cache cannot find the sample in a transformer output of type {type(out).__name__}")


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    """``out`` with its sample replaced, same container type."""
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, tuple):
        return (sample, *out[1:])
    return dataclasses.replace(out, **{dataclasses.fields(out)[0].name: sample})


def _slice_batch(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, rows: slice
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The transformer's arguments cut to ``rows`` of its ``batch``: every tensor whose first dim is the batch."""

    def cut(v: Any) -> Any:
        return v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v

    def cut_kw(k: str, v: Any) -> Any:
        if k in _UNBATCHED_KWARGS:
            return v
        if isinstance(v, dict):
            return {kk: cut(vv) for kk, vv in v.items()}
        return cut(v)

    return tuple(cut(a) for a in args), {k: cut_kw(k, v) for k, v in kwargs.items()}


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The shapes of the transformer's tensor arguments: what its FLOPs depend on."""
    shapes: list[Any] = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += sorted((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return tuple(shapes)


def _fraction(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _as_float(t: Any) -> float | None:
    """The timestep as a number, or None."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


def _paired(inps: tuple[torch.Tensor, ...], j: int, n_out: int) -> torch.Tensor:
    """The input that output ``j`` relates to: its own stream's when inputs and outputs pair up."""
    return inps[j] if len(inps) == n_out else inps[0]


class _Patch:
    """A method wrapper set on one object (a scheduler or pipeline): calls the method, then ``after(obj)``.

    Wrappers of several controllers sharing one object chain, and each unlinks itself wherever it sits
    (``unlink``), so any order of ``disable`` restores the object. A deep copy of the object (some pipelines copy
    their scheduler) gets the unwrapped method, bound to the copy, not a wrapper acting on the original.
    """

    def __init__(self, obj: Any, name: str, after: Callable[[Any], None], owner: object) -> None:
        self.obj, self.after, self.owner = obj, after, owner
        self.had_attr = name in vars(obj)  # whether ``next`` is an instance attribute (else the class's method)
        self.next = getattr(obj, name)
        functools.update_wrapper(self, self.next, updated=())  # name and docstring; not another _Patch's fields

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.next(*args, **kwargs)
        self.after(self.obj)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.next, memo)

    @staticmethod
    def unlink(obj: Any, name: str, owner: object) -> None:
        """Remove ``owner``'s wrapper from ``obj.name``'s chain; the method is as before once no wrapper is left."""
        prev, cur = None, vars(obj).get(name)
        while isinstance(cur, _Patch):
            if cur.owner is owner:
                if prev is not None:
                    prev.next, prev.had_attr = cur.next, cur.had_attr
                elif cur.had_attr:
                    setattr(obj, name, cur.next)
                else:
                    vars(obj).pop(name, None)
                return
            prev, cur = cur, cur.next


class _Controller:
    """Everything relcache attaches to one model: config, modules, hooks and per-context state."""

    def __init__(
        self, model: nn.Module, config: CacheConfig, modules: list[CachedModule], adapter: Adapter,
        record_errors: bool,
    ) -> None:
        self.model = model
        self.config = config
        self.modules = modules
        self.adapter = adapter
        self.record_errors = record_errors
        self.num_steps: int | None = None
        self._ended = False  # the last generation ended: the next step starts a new one
        self.marked = False  # a generation was marked (scheduler or begin_generation): timesteps stay unread
        self.contexts: dict[str, _Context] = {}
        self.current: _Context | None = None
        self.flops: dict[tuple[int, tuple[int, ...]], float] = {}
        self.other_flops: dict[tuple[Any, ...], float] = {}  # whole transformer minus cached modules, per signature
        self.cfg_state = _CFGState()
        self._pending: dict[int, Any] = {}  # module -> (context, shapes, parts) while _plan let it run
        self._counter: Any = None  # a FlopCounterMode around the whole transformer call, while one measures
        self._attached: list[tuple[nn.Module, str, bool]] = []  # (module, hook name, registry existed before)
        self._pipeline: Any = None  # enabled on a pipeline: its scheduler is watched for a swap
        self._scheduler: Any = None  # the scheduler whose methods are patched
        self._patches: list[tuple[Any, str]] = []  # (object, method name) wrapped by a _Patch of this controller
        self.shared = [SharedGroup(g) for g in adapter.shared_modules(model)]  # computed once per call
        self._shared_saved = 0.0  # FLOPs of shared copies not computed in the current call

    # -- generations and steps -------------------------------------------------------------------
    def begin_generation(self, num_steps: int | None = None, *, marked: bool = False) -> None:
        """Start a new generation; ``marked`` when the caller announced it (scheduler or public API), not when
        the runtime noticed it."""
        self._ended = False
        self.marked = self.marked or marked
        for group in self.shared:
            group.new_generation()
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.contexts = {}
        self.current = None
        self.cfg_state = _CFGState()

    def end_generation(self) -> None:
        """A pipeline call ended (it resets diffusers' stateful hooks): free the cached tensors, keep the stats
        readable, and start a new generation at the next step."""
        for ctx in self.contexts.values():
            ctx.states.clear()
        self.cfg_state = _CFGState()
        self._ended = True

    def start_step(self, name: str, step_index: int | None, timestep: float | None) -> None:
        if self._ended:
            self.begin_generation()
        ctx = self.contexts.get(name)
        if ctx is not None and (
            (step_index is not None and step_index <= ctx.step)
            or (timestep is not None and ctx.last_timestep is not None and timestep > ctx.last_timestep)
        ):
            self.begin_generation()
            ctx = None
        if ctx is None:
            ctx = _Context(name, self)  # may raise ConfigError (e.g. target_nfc > steps): nothing changed yet
            self.contexts[name] = ctx
        ctx.step = step_index if step_index is not None else ctx.step + 1
        ctx.last_timestep = timestep
        ctx.decided = False
        ctx.half = False
        ctx.plain = None
        self.current = ctx

    # -- one transformer call -------------------------------------------------------------------
    def run_call(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the transformer for the current step, skipping the unconditional CFG half where CFG-Cache says."""
        ctx = self.current
        cfg = self.config.cfg_cache
        if cfg is None:
            return self._run(ctx, forward, args, kwargs)
        if ctx.name in SPLIT_CONTEXTS:
            return self._run_split(ctx, cfg, forward, args, kwargs)
        return self._run_batched(ctx, cfg, forward, args, kwargs)

    def _run(self, ctx: _Context, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call the transformer and account its FLOPs (the part outside the cached modules measured once)."""
        if torch.compiler.is_compiling():
            return forward(*args, **kwargs)  # no FLOP counting in compiled code
        sig = _signature(args, kwargs)
        executed, full = ctx.executed_flops, ctx.full_flops
        self._shared_saved = 0.0
        if sig in self.other_flops or torch.compiler.is_compiling():
            out = forward(*args, **kwargs)
        else:
            with flop_counter() as counter:
                self._counter = counter
                try:
                    out = forward(*args, **kwargs)
                finally:
                    self._counter = None
            self.other_flops[sig] = max(float(counter.get_total_flops()) - (ctx.executed_flops - executed), 0.0)
        other = self.other_flops.get(sig, 0.0)
        ctx.model_executed_flops += other - self._shared_saved + ctx.executed_flops - executed
        ctx.model_full_flops += other * ctx.batch_scale + ctx.full_flops - full
        return out

    def _run_batched(
        self, ctx: _Context, cfg: CFGCache, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        hidden = first_tensor_input(args, kwargs)
        batch = hidden.shape[0]
        if ctx.cfg_batch is None:
            half = batch // 2
            ctx.cfg_batch = batch % 2 == 0 and batch > 0 and torch.equal(hidden[:half], hidden[half:])
            ctx.cfg_rows = batch
            ctx.cond_first = cfg.cond_first if cfg.cond_first is not None else self.adapter.cfg_cond_first
            if ctx.cfg_batch:
                cfg.window_range(self.num_steps)  # validate the window against the number of steps now
        if not ctx.cfg_batch:
            return self._run(ctx, forward, args, kwargs)
        if batch != ctx.cfg_rows:  # (choice) guidance stopped or changed within the generation: a plain call
            # half the batch: guidance dropped the unconditional half, so the conditional half's states continue
            ctx.plain = "cond" if 2 * batch == ctx.cfg_rows else "all"
            return self._run(ctx, forward, args, kwargs)
        half = batch // 2
        cond_rows, uncond_rows = (slice(0, half), slice(half, batch))
        if not ctx.cond_first:
            cond_rows, uncond_rows = uncond_rows, cond_rows
        half_shape = (half, *hidden.shape[1:])
        state = self.cfg_state
        if cfg.skips(ctx.step, self.num_steps) and state.usable(half_shape):
            ctx.half = True
            out = self._run(ctx, forward, *_slice_batch(args, kwargs, batch, cond_rows))
            cond = _sample_of(out)
            uncond = state.rebuild(cfg, cond, ctx.step, self.num_steps, self.adapter.spatial_grid(args, kwargs))
            ctx.uncond_skipped.append(ctx.step)
            return _with_sample(out, torch.cat([cond, uncond] if ctx.cond_first else [uncond, cond]))
        out = self._run(ctx, forward, args, kwargs)
        if ctx.step in cfg.window_range(self.num_steps):  # only a step inside the window can use the delta
            sample = _sample_of(out)
            state.store(cfg, sample[uncond_rows], sample[cond_rows], half_shape,
                        self.adapter.spatial_grid(args, kwargs))
        return out

    def _run_split(
        self, ctx: _Context, cfg: CFGCache, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        shape = tuple(first_tensor_input(args, kwargs).shape)
        state = self.cfg_state
        if ctx.name == "cond":
            out = self._run(ctx, forward, args, kwargs)
            state.cond = (ctx.step, out, shape)
            return out
        cond = state.cond if state.cond is not None and state.cond[0] == ctx.step and state.cond[2] == shape else None
        if cond is not None and cfg.skips(ctx.step, self.num_steps) and state.usable(shape):
            uncond = state.rebuild(cfg, _sample_of(cond[1]), ctx.step, self.num_steps,
                                   self.adapter.spatial_grid(args, kwargs))
            ctx.uncond_skipped.append(ctx.step)
            modules = sum(self._module_flops(i, sh) for i, sh in ctx.call_shapes.items())
            ctx.full_flops += modules
            ctx.model_full_flops += self.other_flops.get(_signature(args, kwargs), 0.0) + modules
            return _with_sample(cond[1], uncond)
        out = self._run(ctx, forward, args, kwargs)
        if cond is not None and ctx.step in cfg.window_range(self.num_steps):
            state.store(cfg, _sample_of(out), _sample_of(cond[1]), shape, self.adapter.spatial_grid(args, kwargs))
        return out

    # -- the cached modules ---------------------------------------------------------------------
    def module_forward(self, idx: int, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # _plan and _record run eagerly under torch.compile (graph breaks): compiled graphs must not read the
        # per-step Python state (step numbers, schedule decisions), or dynamo recompiles them at every step.
        pred = self._plan(idx, original, args, kwargs)
        if pred is not None:
            return pred
        out = self._measured(idx, original, args, kwargs)
        self._record(idx, out)
        return out

    @torch.compiler.disable
    def _plan(self, idx: int, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The prediction at a cached step, or None when the module must run (``_record`` then takes its output)."""
        self._pending.pop(idx, None)
        ctx = self.current
        if ctx is None:  # called outside a transformer forward: behave as the plain module
            return None
        got = self.modules[idx].input_of(args, kwargs)
        inps = got if isinstance(got, tuple) else (got,)  # dual-stream modules: one input per output
        rows = ctx.parts(inps[0].shape[0])
        if not ctx.decided:
            ctx.decided = True
            schedule = self.config.schedule
            probe = None
            if schedule.uses_input:  # on a CFG batch, the conditional half (it runs at every step)
                probe = _take(inps[0], next(sl for part, sl in rows if part != "uncond"))
            ctx.full = schedule.decide(ctx.schedule_state, ctx.step, probe)
            if ctx.full:
                ctx.full_steps.append(ctx.step)
        shapes = tuple(tuple(x.shape) for x in inps)
        ctx.call_shapes[idx] = shapes
        parts = [_Part(part, sl, inps, shapes) if sl is None else _Part.cut(part, sl, inps) for part, sl in rows]
        if ctx.full or any(
            ctx.states.get((idx, p.name)) is None or ctx.shapes.get((idx, p.name)) != p.shapes for p in parts
        ):
            self._pending[idx] = (ctx, shapes, parts)
            return None
        predictor = self.config.predictor
        per_part = []
        for part, _, xs, _ in parts:
            states = ctx.states[(idx, part)]
            per_part.append([predictor.predict(st, ctx.step, self.num_steps, _paired(xs, j, len(states)))
                             for j, st in enumerate(states)])
        preds = per_part[0] if len(per_part) == 1 else [torch.cat(outs) for outs in zip(*per_part, strict=True)]
        ctx.full_flops += self._module_flops(idx, shapes) * ctx.batch_scale
        if self.record_errors:
            true = original(*args, **kwargs)
            trues = true if isinstance(true, tuple) else (true,)
            ctx.module_errors.setdefault(idx, {})[ctx.step] = relative_l1(preds[0], trues[0])
        return tuple(preds) if ctx.tuple_out.get(idx, False) else preds[0]

    def _measured(self, idx: int, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the module; in eager mode, count its FLOPs the first time it runs on these input shapes."""
        if torch.compiler.is_compiling() or idx not in self._pending:  # no FLOP counting in compiled code
            return original(*args, **kwargs)
        key = (idx, self._pending[idx][1])
        if key in self.flops:
            return original(*args, **kwargs)
        if self._counter is not None:  # the whole transformer is being measured: take the difference
            before = self._counter.get_total_flops()
            out = original(*args, **kwargs)
            self.flops[key] = float(self._counter.get_total_flops() - before)
            return out
        with flop_counter() as counter:
            out = original(*args, **kwargs)
        self.flops[key] = float(counter.get_total_flops())
        return out

    @torch.compiler.disable
    def _record(self, idx: int, out: Any) -> None:
        """Update module ``idx``'s predictor states with the output it just computed (if ``_plan`` let it run)."""
        if idx not in self._pending:
            return
        ctx, shapes, parts = self._pending.pop(idx)
        key = (idx, shapes)
        outs = out if isinstance(out, tuple) else (out,)
        ctx.tuple_out[idx] = isinstance(out, tuple)
        for part, sl, xs, part_shapes in parts:
            states = ctx.states.get((idx, part))
            if states is None or len(states) != len(outs):
                states = [self.config.predictor.new_state(self.config.cache_dtype) for _ in outs]
                ctx.states[(idx, part)] = states
            for j, (state, o) in enumerate(zip(states, outs, strict=True)):
                self.config.predictor.update(state, ctx.step, _paired(xs, j, len(outs)), _take(o, sl))
            ctx.shapes[(idx, part)] = part_shapes
        flops = self.flops.get(key, 0.0)
        ctx.executed_flops += flops
        ctx.full_flops += flops * ctx.batch_scale

    def _module_flops(self, idx: int, shapes: tuple[tuple[int, ...], ...]) -> float:
        """FLOPs of module ``idx`` on inputs of ``shapes``: measured, else scaled from another batch size (linear)."""
        got = self.flops.get((idx, shapes))
        if got is not None:
            return got
        for (j, other), flops in self.flops.items():
            if j == idx and len(other) == len(shapes) and other[0][0] and all(
                a[1:] == b[1:] for a, b in zip(other, shapes, strict=True)
            ):
                return flops * shapes[0][0] / other[0][0]
        return 0.0

    # -- attach / detach ------------------------------------------------------------------------
    def attach(self, pipeline: Any) -> None:
        # accelerate's model offload hook must stay outermost: pipelines re-apply it after every call by restoring
        # the forward it wrapped (``_old_forward``), which would drop a wrapper registered over it
        hf_hook = getattr(self.model, "_hf_hook", None)
        if hf_hook is not None:
            from accelerate.hooks import add_hook_to_module, remove_hook_from_module

            remove_hook_from_module(self.model)
        self._register(self.model, _StepHook(self), _STEP_HOOK)
        if hf_hook is not None:
            add_hook_to_module(self.model, hf_hook)
        for idx, spec in enumerate(self.modules):
            self._register(spec.module, _ModuleHook(self, idx), _MODULE_HOOK)
        for group in self.shared:
            for i, module in enumerate(group.modules):
                self._register(module, SharedHook(group, i, self), _SHARED_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        if pipeline is not None:
            self._pipeline = pipeline
            self._patch(pipeline, "maybe_free_model_hooks", self._after_call)
            self._patch_scheduler(getattr(pipeline, "scheduler", None))

    # -- shared copies (relcache.shared.SharingHost) ------------------------------------------------
    def sharing(self) -> bool:
        return self.current is not None

    def flop_counter_now(self) -> Any:
        return self._counter

    def add_saved_flops(self, flops: float) -> None:
        self._shared_saved += flops

    def _register(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        existed = hasattr(module, "_diffusers_hook")
        registry = HookRegistry.check_if_exists_or_initialize(module)
        self._attached.append((module, name, existed))
        registry.register_hook(hook, name)

    def _patch(self, obj: Any, name: str, after: Callable[[Any], None]) -> None:
        """Wrap ``obj.name`` (a method) so that ``after(obj)`` runs after it; ``detach`` unlinks the wrapper."""
        if not callable(getattr(obj, name, None)):
            return
        patch = _Patch(obj, name, after, self)
        setattr(obj, name, patch)
        self._patches.append((obj, name))

    def _unpatch(self, obj: Any) -> None:
        """Unlink this controller's wrappers of ``obj``'s methods, wherever they sit in a chain of wrappers."""
        for entry in [e for e in self._patches if e[0] is obj]:
            _Patch.unlink(obj, entry[1], self)
            self._patches.remove(entry)

    def _patch_scheduler(self, scheduler: Any) -> None:
        """``set_timesteps`` (every pipeline calls it first) and ``set_begin_index`` (img2img pipelines skip the
        first timesteps with it, after ``set_timesteps``) start a generation of the steps that will run."""
        self._scheduler = scheduler
        if scheduler is None:
            return
        self._patch(scheduler, "set_timesteps", self._new_schedule)
        self._patch(scheduler, "set_begin_index", self._new_schedule)

    def _new_schedule(self, scheduler: Any) -> None:
        self.begin_generation(_steps_to_run(scheduler), marked=True)

    def _after_call(self, pipeline: Any) -> None:
        # every diffusers pipeline calls maybe_free_model_hooks at the end of __call__; transformers without
        # diffusers' CacheMixin (DiT, PixArt, SD3) are otherwise never told that the call ended
        self.end_generation()

    def check_scheduler(self) -> None:
        """At each transformer call: a scheduler swapped into the pipeline since enable (``pipe.scheduler =
        ...from_config(...)``) set its timesteps unpatched, so this call starts its generation."""
        if self._pipeline is None:
            return
        scheduler = getattr(self._pipeline, "scheduler", None)
        if scheduler is not self._scheduler:
            if self._scheduler is not None:
                self._unpatch(self._scheduler)
            self._patch_scheduler(scheduler)
            self._new_schedule(scheduler)

    def detach(self) -> None:
        """Remove every hook and patch, leaving modules exactly as they were."""
        for module, name, existed in reversed(self._attached):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            # an accelerate hook added after ours (enable_model_cpu_offload) wraps our forward, and remove_hook
            # would overwrite it: take it off first and put it back after
            hf_hook = getattr(module, "_hf_hook", None)
            if hf_hook is not None:
                from accelerate.hooks import add_hook_to_module, remove_hook_from_module

                remove_hook_from_module(module)
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                # remove_hook leaves the original bound method as an instance attribute: drop it.
                fwd = vars(module).get("forward")
                if getattr(fwd, "__self__", None) is module and getattr(fwd, "__func__", None) is type(
                    module
                ).forward:
                    del module.forward
                if not existed:
                    del module._diffusers_hook
            if hf_hook is not None:
                add_hook_to_module(module, hf_hook)
        self._attached = []
        while self._patches:
            self._unpatch(self._patches[0][0])
        self._scheduler = None
        self._pipeline = None
        root = getattr(self.model, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()

    def stats(self) -> CacheStats:
        per = {name: ctx.stats(self.modules) for name, ctx in self.contexts.items()}
        if len(per) == 1:
            only = next(iter(per.values()))
            return CacheStats(self.config.label, only.nfc, only.num_steps, only.full_steps,
                              only.flops_fraction, per, only.model_flops_fraction, only.uncond_skipped,
                              only.cache_bytes + self.cfg_state.nbytes)
        steps = sorted({s for c in per.values() for s in c.full_steps})
        flops = _fraction(sum(c.executed_flops for c in per.values()), sum(c.full_flops for c in per.values()))
        model = _fraction(
            sum(c.model_executed_flops for c in per.values()), sum(c.model_full_flops for c in per.values())
        )
        num_steps = max((c.num_steps for c in per.values()), default=0)
        skipped = sum(c.uncond_skipped for c in per.values())
        held = sum(c.cache_bytes for c in per.values()) + self.cfg_state.nbytes
        return CacheStats(self.config.label, len(steps), num_steps, steps, flops, per, model, skipped, held)


class _StepHook(ModelHook):
    """On the transformer: marks the start of a step in the current call context and runs the call."""

    _is_stateful = True

    def __init__(self, ctrl: _Controller) -> None:
        super().__init__()
        self.ctrl = ctrl
        self.cache_context = StateManager(_NoState)  # diffusers' model.cache_context(...) sets it

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.ctrl.adapter.extra_call(args, kwargs):  # the plain model: no step, no cache, no FLOPs counted
            return self.fn_ref.original_forward(*args, **kwargs)
        self._start(args, kwargs)
        try:
            return self.ctrl.run_call(self.fn_ref.original_forward, args, kwargs)
        finally:
            self._end()

    @torch.compiler.disable
    def _start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = self.cache_context._context
        name = context.name if context is not None else DEFAULT_CONTEXT
        step_index = getattr(context, "step_index", None) if context is not None else None
        self.ctrl.check_scheduler()
        # The timestep only serves to notice unmarked new generations: once one was marked it is not read on any
        # device (on an accelerator reading it is a host sync; a device-dependent rule would make a marked loop
        # behave differently on CPU and GPU).
        timestep = None if self.ctrl.marked else _as_float(self.ctrl.adapter.timestep_of(args, kwargs))
        self.ctrl.start_step(name, step_index, timestep)

    @torch.compiler.disable
    def _end(self) -> None:
        self.ctrl.current = None
        for group in self.ctrl.shared:
            group.end_call()

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.ctrl.end_generation()
        return module


class _ModuleHook(ModelHook):
    """On a cached module: full computation or prediction, as the controller decides."""

    def __init__(self, ctrl: _Controller, idx: int) -> None:
        super().__init__()
        self.ctrl = ctrl
        self.idx = idx

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.ctrl.module_forward(self.idx, self.fn_ref.original_forward, args, kwargs)


def _steps_to_run(scheduler: Any) -> int | None:
    """Transformer calls per context the scheduler's timesteps will take: those from its begin index on."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    return max(len(timesteps) - int(begin), 0)
