"""The runtime: attaches a ``CacheConfig`` to a model and runs it.

It uses diffusers' hook registry: one hook on the transformer marks the start of each step and reads the
call context, and one hook per cached module returns either the module's real output (full step, recorded
by the predictor) or the predictor's forecast (cached step). The schedule decides once per step, when the
first cached module is reached.

Generations and steps:

* Enabled on a pipeline, the scheduler's ``set_timesteps`` (which every diffusers pipeline calls first)
  starts a new generation and announces its number of steps.
* In a hand-written loop, call :func:`begin_generation` before the loop. Failing that, a timestep larger
  than the previous one in the same context also starts a new generation.
* The step index is the number of transformer calls in the current context, or the ``step_index`` of a
  diffusers ``cache_context`` when the pipeline passes one.
* Each call context keeps its own state. The context is diffusers' ``cache_context`` name (pipelines that
  run CFG as separate cond and uncond calls set it) or ``"default"``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
from torch import nn

from .errors import AlreadyEnabledError, ConfigError, NotEnabledError
from .flops import flop_counter
from .methods.config import CacheConfig
from .methods.history import sample_norm
from .methods.predictors import PredictorState
from .models.base import Adapter, CachedModule, find_adapter

_ATTR = "_relcache"
_STEP_HOOK = "relcache_step"
_MODULE_HOOK = "relcache_module"
DEFAULT_CONTEXT = "default"


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


@dataclass(frozen=True)
class CacheStats:
    """What caching did in the last generation.

    With one context (CFG batched, or no CFG) the top-level fields are that context's. With several
    (CFG split into calls), ``full_steps`` is the union of their full steps, ``nfc`` its length,
    ``num_steps`` the largest, and ``flops_fraction`` pools the FLOPs of all contexts.
    """

    method: str
    nfc: int
    num_steps: int
    full_steps: list[int]
    flops_fraction: float
    contexts: dict[str, ContextStats]


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
        self.states: dict[int, list[PredictorState]] = {}
        self.shapes: dict[int, tuple[tuple[int, ...], ...]] = {}
        self.tuple_out: dict[int, bool] = {}  # whether each module returns a tuple of tensors
        self.executed_flops = 0.0
        self.full_flops = 0.0
        self.module_errors: dict[int, dict[int, float]] = {}

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
        )


def _fraction(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _as_float(t: Any) -> float | None:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


def _paired(inps: tuple[torch.Tensor, ...], j: int, n_out: int) -> torch.Tensor:
    """The input that output ``j`` relates to: its own stream's when inputs and outputs pair up."""
    return inps[j] if len(inps) == n_out else inps[0]


def _rel_l1(pred: torch.Tensor, true: torch.Tensor) -> float:
    den = sample_norm(true, 1).clamp_min(torch.finfo(torch.float32).tiny)
    return float((sample_norm(pred - true, 1) / den).mean())


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
        self.contexts: dict[str, _Context] = {}
        self.current: _Context | None = None
        self.flops: dict[tuple[int, tuple[int, ...]], float] = {}
        self._attached: list[tuple[nn.Module, str, bool]] = []  # (module, hook name, registry existed before)
        self._scheduler: Any = None
        self._scheduler_had_attr = False

    # -- generations and steps -------------------------------------------------------------------
    def begin_generation(self, num_steps: int | None = None) -> None:
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.contexts = {}
        self.current = None

    def start_step(self, name: str, step_index: int | None, timestep: float | None) -> None:
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
        self.current = ctx

    # -- the cached modules ---------------------------------------------------------------------
    def module_forward(self, idx: int, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ctx = self.current
        if ctx is None:  # called outside a transformer forward: behave as the plain module
            return original(*args, **kwargs)
        got = self.modules[idx].input_of(args, kwargs)
        inps = got if isinstance(got, tuple) else (got,)  # dual-stream modules: one input per output
        if not ctx.decided:
            ctx.decided = True
            schedule = self.config.schedule
            ctx.full = schedule.decide(ctx.schedule_state, ctx.step, inps[0] if schedule.uses_input else None)
            if ctx.full:
                ctx.full_steps.append(ctx.step)
        shapes = tuple(tuple(x.shape) for x in inps)
        key = (idx, shapes)
        states = ctx.states.get(idx)
        if ctx.full or states is None or ctx.shapes.get(idx) != shapes:
            return self._compute(ctx, idx, key, original, args, kwargs, inps)
        predictor = self.config.predictor
        preds = [predictor.predict(st, ctx.step, self.num_steps, _paired(inps, j, len(states)))
                 for j, st in enumerate(states)]
        ctx.full_flops += self.flops.get(key, 0.0)
        if self.record_errors:
            true = original(*args, **kwargs)
            trues = true if isinstance(true, tuple) else (true,)
            ctx.module_errors.setdefault(idx, {})[ctx.step] = _rel_l1(preds[0], trues[0])
        return tuple(preds) if ctx.tuple_out.get(idx, False) else preds[0]

    def _compute(
        self, ctx: _Context, idx: int, key: tuple[int, Any], original: Any,
        args: tuple[Any, ...], kwargs: dict[str, Any], inps: tuple[torch.Tensor, ...],
    ) -> Any:
        if key in self.flops or torch.compiler.is_compiling():
            out = original(*args, **kwargs)
        else:
            with flop_counter() as counter:
                out = original(*args, **kwargs)
            self.flops[key] = float(counter.get_total_flops())
        outs = out if isinstance(out, tuple) else (out,)
        states = ctx.states.get(idx)
        if states is None or len(states) != len(outs):
            states = [self.config.predictor.new_state(self.config.cache_dtype) for _ in outs]
            ctx.states[idx] = states
            ctx.tuple_out[idx] = isinstance(out, tuple)
        for j, (state, o) in enumerate(zip(states, outs, strict=True)):
            self.config.predictor.update(state, ctx.step, _paired(inps, j, len(outs)), o)
        ctx.shapes[idx] = key[1]
        flops = self.flops.get(key, 0.0)
        ctx.executed_flops += flops
        ctx.full_flops += flops
        return out

    # -- attach / detach ------------------------------------------------------------------------
    def attach(self, scheduler: Any) -> None:
        self._register(self.model, _StepHook(self), _STEP_HOOK)
        for idx, spec in enumerate(self.modules):
            self._register(spec.module, _ModuleHook(self, idx), _MODULE_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            self._patch_scheduler(scheduler)

    def _register(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        existed = hasattr(module, "_diffusers_hook")
        registry = HookRegistry.check_if_exists_or_initialize(module)
        self._attached.append((module, name, existed))
        registry.register_hook(hook, name)

    def _patch_scheduler(self, scheduler: Any) -> None:
        original = scheduler.set_timesteps
        self._scheduler = scheduler
        self._scheduler_had_attr = "set_timesteps" in vars(scheduler)
        self._scheduler_original = original

        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.begin_generation(len(scheduler.timesteps))
            return result

        scheduler.set_timesteps = set_timesteps

    def detach(self) -> None:
        """Remove every hook and patch, leaving modules exactly as they were."""
        for module, name, existed in reversed(self._attached):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
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
        self._attached = []
        if self._scheduler is not None:
            if self._scheduler_had_attr:
                self._scheduler.set_timesteps = self._scheduler_original
            else:
                vars(self._scheduler).pop("set_timesteps", None)
            self._scheduler = None
        root = getattr(self.model, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()

    def stats(self) -> CacheStats:
        per = {name: ctx.stats(self.modules) for name, ctx in self.contexts.items()}
        if len(per) == 1:
            only = next(iter(per.values()))
            return CacheStats(self.config.label, only.nfc, only.num_steps, only.full_steps,
                              only.flops_fraction, per)
        steps = sorted({s for c in per.values() for s in c.full_steps})
        executed = sum(c.executed_flops for c in per.values())
        full = sum(c.full_flops for c in per.values())
        num_steps = max((c.num_steps for c in per.values()), default=0)
        return CacheStats(self.config.label, len(steps), num_steps, steps, _fraction(executed, full), per)


class _StepHook(ModelHook):
    """On the transformer: marks the start of a step in the current call context."""

    _is_stateful = True

    def __init__(self, ctrl: _Controller) -> None:
        super().__init__()
        self.ctrl = ctrl
        self.cache_context = StateManager(_NoState)  # diffusers' model.cache_context(...) sets it

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        context = self.cache_context._context
        name = context.name if context is not None else DEFAULT_CONTEXT
        step_index = getattr(context, "step_index", None) if context is not None else None
        self.ctrl.start_step(name, step_index, _as_float(self.ctrl.adapter.timestep_of(args, kwargs)))
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.ctrl.current = None
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.ctrl.begin_generation()
        return module


class _ModuleHook(ModelHook):
    """On a cached module: full computation or prediction, as the controller decides."""

    def __init__(self, ctrl: _Controller, idx: int) -> None:
        super().__init__()
        self.ctrl = ctrl
        self.idx = idx

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.ctrl.module_forward(self.idx, self.fn_ref.original_forward, args, kwargs)


# -- public API -------------------------------------------------------------------------------------
def _resolve(obj: Any) -> tuple[nn.Module, Any]:
    """(transformer, scheduler or None) of a pipeline or a bare model."""
    if isinstance(obj, nn.Module):
        return obj, None
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, getattr(obj, "scheduler", None)
    raise TypeError(
        f"expected a diffusers pipeline with a .transformer or a transformer nn.Module, got {type(obj).__name__}"
    )


def _controller(obj: Any) -> _Controller | None:
    model, _ = _resolve(obj)
    return vars(model).get(_ATTR)


def enable(obj: Any, config: CacheConfig, *, adapter: Adapter | None = None, record_errors: bool = False) -> None:
    """Turn caching on for a diffusers pipeline or transformer.

    ``adapter`` overrides the automatic choice (for your own models). ``record_errors`` (analysis only)
    also runs every cached module at cached steps and records the relative L1 error of each prediction
    against it, so it saves no time.
    """
    if not isinstance(config, CacheConfig):
        raise ConfigError(
            f"config must be a relcache.CacheConfig (e.g. relcache.RFC(target_nfc=14)), got {type(config).__name__}"
        )
    model, scheduler = _resolve(obj)
    if _controller(model) is not None:
        raise AlreadyEnabledError(
            f"relcache is already enabled on this {type(model).__name__}; call relcache.disable first"
        )
    chosen = find_adapter(model, adapter)
    modules = chosen.cached_modules(model)
    if config.modules is not None:
        modules = [m for m in modules if m.kind in config.modules]
    if not modules:
        raise ConfigError(f"no module of the kinds {config.modules} in {type(model).__name__}")
    ctrl = _Controller(model, config, modules, chosen, record_errors)
    try:
        ctrl.attach(scheduler)
    except BaseException:
        ctrl.detach()
        raise
    vars(model)[_ATTR] = ctrl


def disable(obj: Any) -> None:
    """Turn caching off; the model is exactly as before ``enable``."""
    model, _ = _resolve(obj)
    ctrl = _controller(model)
    if ctrl is None:
        raise NotEnabledError(f"relcache is not enabled on this {type(model).__name__}")
    ctrl.detach()
    del vars(model)[_ATTR]


def is_enabled(obj: Any) -> bool:
    """Whether relcache is enabled on ``obj``."""
    return _controller(obj) is not None


@contextlib.contextmanager
def cached(obj: Any, config: CacheConfig, **kwargs: Any) -> Iterator[None]:
    """``with relcache.cached(pipe, config): pipe(...)`` enables caching for the block only."""
    enable(obj, config, **kwargs)
    try:
        yield
    finally:
        disable(obj)


def begin_generation(obj: Any, num_steps: int | None = None) -> None:
    """Mark the start of a new generation in a hand-written sampling loop (no-op when caching is off).

    ``num_steps`` is the number of transformer calls per context in the generation; ``RFC(target_nfc=...)``
    needs it.
    """
    ctrl = _controller(obj)
    if ctrl is not None:
        ctrl.begin_generation(num_steps)


def stats(obj: Any) -> CacheStats:
    """What caching did in the last (or current) generation."""
    ctrl = _controller(obj)
    if ctrl is None:
        raise NotEnabledError("relcache is not enabled on this object; nothing to report")
    return ctrl.stats()
