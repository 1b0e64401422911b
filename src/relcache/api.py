"""The public API: turn caching on and off, mark generations, read what caching did.

The runtime's ``Session`` for a model is kept on the model itself (the unwrapped module when it is compiled), so
a pipeline, its transformer and ``torch.compile(transformer)`` all reach the same session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .errors import AlreadyEnabledError, ConfigError, NotEnabledError
from .methods.config import CacheConfig
from .models.base import Adapter, find_adapter, unsupported
from .runtime import CacheStats, Session, checked_num_steps
from .runtime.attachment import refuse_diffusers_cache
from .runtime.experts import Expert, Experts
from .runtime.patches import patching_hosts

_ATTR = "_relcache"  # the model attribute holding its Session


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs: relcache's state lives there, so
    ``begin_generation``, ``stats`` and ``disable`` work on the compiled object as on the model."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def _resolve(obj: Any) -> tuple[nn.Module, Any]:
    """(transformer, the pipeline or None) of a pipeline or a bare model, either possibly compiled."""
    if isinstance(obj, nn.Module):
        return _unwrap(obj), None
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return _unwrap(transformer), obj
    unet = " (a UNet pipeline: relcache caches the blocks of diffusion transformers)" if isinstance(
        getattr(obj, "unet", None), nn.Module) else ""
    raise unsupported(  # an UnsupportedModelError: a TypeError, as before it named the models served
        f"expected a diffusers pipeline with a .transformer, or a transformer nn.Module, got {type(obj).__name__}"
        f"{unet}")


def _session(obj: Any) -> Session | None:
    model, _ = _resolve(obj)
    return vars(model).get(_ATTR)


def enable(obj: Any, config: CacheConfig, *, adapter: Adapter | None = None, record_errors: bool = False,
           count_flops: bool = True, sequence_group: Any = None, batch_modulation: bool = False) -> None:
    """Turn caching on for a diffusers pipeline or transformer (compiled or not). On a pipeline whose generation runs
    several transformers in turn (Wan 2.2's ``transformer`` and ``transformer_2``) every one is cached, as one
    generation with one step count and one budget (docs/spec.md, "Several transformers").

    ``adapter`` overrides the automatic choice (for your own models). ``record_errors`` (analysis only)
    also runs every cached module at cached steps and records the relative L1 error of each prediction
    against it, so it saves no time. ``count_flops=False`` skips FLOP measurement (``stats`` then gives the FLOP
    fields as NaN, with ``flops_unknown`` saying why); with it on, a model whose operators cannot be counted (flex
    attention) is counted as unknown the same way, and the generation runs as without counting.
    ``sequence_group``: the ``torch.distributed`` process group whose processes each hold a slice of the sequence
    (e.g. xDiT's sequence-parallel group); by default diffusers' context-parallel group when ``enable_parallelism``
    was called first (docs/distributed.md). ``record_errors`` runs every step eagerly, even under ``torch.compile``.
    ``batch_modulation=True`` computes every step's adaLN projections at a generation's first step, in one product
    per block, when the timesteps are announced (a pipeline's scheduler, or ``begin_generation(..., timesteps=...)``):
    exact up to rounding, and at small batch a large share of a cached step (docs/performance.md; DiT only).

    Example (runs offline on a tiny random DiT)::

        >>> import relcache, torch
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...                               num_layers=2, sample_size=8, num_embeds_ada_norm=10).eval()
        >>> relcache.enable(model, relcache.FORA(interval=3, warmup=1))
        >>> x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.tensor([1])
        >>> with torch.no_grad():
        ...     for step in range(7):
        ...         _ = model(x, timestep=t - step, class_labels=y)
        >>> relcache.stats(model).full_steps
        [0, 3, 6]
        >>> relcache.disable(model)
    """
    if not isinstance(config, CacheConfig):
        raise ConfigError(
            f"config must be a relcache.CacheConfig (e.g. relcache.RFC(target_nfc=14)), got {type(config).__name__}"
        )
    if adapter is not None and not isinstance(adapter, Adapter):
        raise ConfigError(
            "adapter must be None (chosen from the model) or a relcache.models.Adapter instance, e.g. "
            f"relcache.CustomAdapter(...); got {adapter!r}"
        )
    if not isinstance(record_errors, bool):
        raise ConfigError(f"record_errors must be True or False, got {record_errors!r}")
    if not isinstance(count_flops, bool):
        raise ConfigError(f"count_flops must be True or False, got {count_flops!r}")
    if not isinstance(batch_modulation, bool):
        raise ConfigError(f"batch_modulation must be True or False, got {batch_modulation!r}")
    if sequence_group is not None and not isinstance(sequence_group, ProcessGroup):
        raise ConfigError(f"sequence_group must be None or a torch.distributed ProcessGroup, got {sequence_group!r}")
    model, pipeline = _resolve(obj)
    existing = _session(model)
    if existing is not None:
        _attach_shared(existing, model, pipeline, config, adapter, record_errors, count_flops, batch_modulation)
        return
    chosen = find_adapter(model, adapter)
    if batch_modulation and chosen.modulation(model) is None:
        raise ConfigError(
            f"batch_modulation=True: relcache knows no per-step modulation projections of {type(model).__name__} "
            f"({type(chosen).__name__}); it is available for diffusers' DiTTransformer2DModel. Enable with "
            "batch_modulation=False."
        )
    experts = _experts(chosen, model, pipeline)
    refuse_diffusers_cache(experts)
    for name, expert in experts[1:]:
        if vars(expert).get(_ATTR) is not None:
            raise AlreadyEnabledError(
                f"relcache is already enabled on this pipeline's {name} ({type(expert).__name__}); "
                "relcache.enable(pipe, ...) caches every expert of the pipeline: call relcache.disable on it first"
            )
    modules, spans = [], []
    for name, expert in experts:
        own = chosen.cached_modules(expert)
        if config.modules is not None:
            own = [m for m in own if m.kind in config.modules]
        if not own and config.modules is None:
            raise ConfigError(f"{type(chosen).__name__} found no module to cache in {type(expert).__name__}: check "
                              "the adapter's blocks and module names")
        if not own:
            kinds = sorted({m.kind for m in chosen.cached_modules(expert)})
            raise ConfigError(f"no module of the kinds {config.modules} in {type(expert).__name__} (it has {kinds})")
        inside = {id(sub) for sub in expert.modules()}
        for m in own:  # found by review: another model's modules were accepted, cached nothing, and stats said saved
            if id(m.module) not in inside:
                raise ConfigError(
                    f"cached module {m.name!r} ({type(m.module).__name__}) is not a submodule of the "
                    f"{type(expert).__name__} being enabled, so it would never run under relcache: the adapter's "
                    "blocks belong to another model (a CustomAdapter given another instance's list of blocks, e.g. "
                    "before a deepcopy); give the blocks by name (blocks='blocks')")
        seen: dict[int, str] = {}
        for m in own:  # one module in two places would get two hooks (diffusers refuses) and one shared cache
            if id(m.module) in seen:
                raise ConfigError(f"{seen[id(m.module)]!r} and {m.name!r} are the same module object of "
                                  f"{type(expert).__name__}: a cached module must sit in one place, called once per "
                                  "transformer call (docs/custom-models.md)")
            seen[id(m.module)] = m.name
        for m in own:  # nested: the inner module's forecast would run inside the outer's, its FLOPs count twice
            for sub in m.module.modules():
                if sub is not m.module and id(sub) in seen:
                    raise ConfigError(f"{seen[id(sub)]!r} sits inside {m.name!r} of {type(expert).__name__}: cached "
                                      "modules must not nest; cache one of them (docs/custom-models.md)")
        if len(experts) > 1:  # (choice) module names say which expert they belong to
            own = [replace(m, name=f"{name}.{m.name}") for m in own]
        spans.append(range(len(modules), len(modules) + len(own)))
        modules += own
    group = None if len(experts) == 1 else Experts([Expert(n, m, r) for (n, m), r in zip(experts, spans, strict=True)])
    session = Session(model, config, modules, chosen, record_errors, count_flops, sequence_group, group,
                      batch_modulation)
    try:
        session.attach(pipeline)
    except BaseException:
        session.detach()
        raise
    for _, expert in experts:
        vars(expert)[_ATTR] = session


def _experts(adapter: Adapter, model: nn.Module, pipeline: Any) -> list[tuple[str, nn.Module]]:
    """The transformers one ``enable`` serves: ``model``, and on a pipeline whose generation runs several in turn
    (Wan 2.2's ``transformer`` and ``transformer_2``) all of them, in the order a generation first calls them; (choice)
    one session covers them all (docs/spec.md, §Several transformers)."""
    if pipeline is None:
        return [("transformer", model)]
    found: list[tuple[str, nn.Module]] = []
    for name, m in adapter.pipeline_transformers(pipeline):
        if all(_unwrap(m) is not other for _, other in found):  # one module held twice is one transformer
            found.append((name, _unwrap(m)))
    return found if len(found) > 1 and found[0][1] is model else [("transformer", model)]


def _attach_shared(session: Session, model: nn.Module, pipeline: Any, config: CacheConfig, adapter: Adapter | None,
                   record_errors: bool, count_flops: bool = True, batch_modulation: bool = False) -> None:
    """``enable`` on a pipeline whose transformer is already enabled through another pipeline: (choice) with the
    same settings the pipeline is attached (its scheduler and the end of its calls mark its generations); with other
    settings, or a second ``enable`` of the same object, it is refused, because one transformer has one cache."""
    name = type(model).__name__
    if pipeline is None or session.generations.watches(pipeline, explicit=True):
        raise AlreadyEnabledError(f"relcache is already enabled on this {name}; call relcache.disable first")
    served = [session.model] if session.experts is None else [e.model for e in session.experts.experts]
    if [m for _, m in _experts(session.adapter, model, pipeline)] != served:
        raise AlreadyEnabledError(
            f"this pipeline's {name} is already enabled, serving other transformers than this pipeline runs (e.g. "
            "its transformer alone, without transformer_2); call relcache.disable first, then enable the pipeline"
        )
    same_adapter = adapter is None or type(adapter) is type(session.adapter)
    # found by review: another count_flops or batch_modulation was accepted and ignored (the session's own served)
    if (config != session.config or record_errors != session.record_errors or not same_adapter
            or count_flops != session.count_flops or batch_modulation != session.batch_modulation):
        raise AlreadyEnabledError(
            f"this pipeline's {name} is already enabled (by another pipeline sharing it, or on its own) with "
            f"{session.config.label} (record_errors={session.record_errors}, count_flops={session.count_flops}, "
            f"batch_modulation={session.batch_modulation}, adapter {type(session.adapter).__name__}); a shared "
            "transformer has one cache config: enable this pipeline with the same settings to attach it, or call "
            "relcache.disable first"
        )
    session.generations.watch(pipeline)


def disable(obj: Any) -> None:
    """Turn caching off; the model is exactly as before ``enable``. On a transformer shared by several pipelines,
    caching is off for all of them (the cache belongs to the transformer). On a pipeline whose ``transformer`` was
    replaced since ``enable``, the pipeline is detached from its earlier transformer's caching, which is turned off
    unless another enabled pipeline shares it."""
    model, pipeline = _resolve(obj)
    session = _session(model)
    if session is not None:
        _turn_off(session)
        return
    # (choice) a pipeline whose transformer was replaced since ``enable``: the session ``enable`` attached it to
    # serves its previous transformer, which the user may no longer hold. The pipeline is detached from it; the
    # session is turned off too unless another pipeline was enabled on it (a session that only found this pipeline
    # driving its transformer is not this pipeline's to turn off)
    earlier = [] if pipeline is None else [h for h in patching_hosts(pipeline) if isinstance(h, Session)
                                           and h.generations.watches(pipeline, explicit=True)]
    if not earlier:
        raise NotEnabledError(f"relcache is not enabled on this {type(model).__name__}")
    for stale in earlier:
        others = [p for p in stale.generations.explicit_pipelines() if p is not pipeline]
        if others:
            stale.generations.unwatch_pipeline(pipeline)
        else:
            _turn_off(stale)


def _turn_off(session: Session) -> None:
    """Detach ``session`` and forget it on every transformer it serves (also where the detach ends by raising: a
    batch-modulation mismatch is found only there, ``ModulationMismatch``)."""
    try:
        session.detach()
    finally:
        for expert in [session.model] if session.experts is None else [e.model for e in session.experts.experts]:
            vars(expert).pop(_ATTR, None)


def is_enabled(obj: Any) -> bool:
    """Whether relcache is enabled on ``obj``; False for anything relcache cannot serve (a UNet pipeline, None)."""
    try:
        return _session(obj) is not None
    except TypeError:  # neither a transformer nor a pipeline with one
        return False


@contextlib.contextmanager
def cached(obj: Any, config: CacheConfig, **kwargs: Any) -> Iterator[None]:
    """``with relcache.cached(pipe, config): pipe(...)`` enables caching for the block only. (choice) Inside a block
    that already enabled the transformer (``cached(pipe.transformer, ...)``, or another pipeline sharing it), the
    pipeline is attached for the block and detached at its end, and caching stays on: the outer block's to turn
    off. A block whose caching was turned off inside it (``disable``) ends without a second ``disable``."""
    session = _session(obj) if is_enabled(obj) else None
    _, pipeline = _resolve(obj)
    attached_before = session is not None and pipeline is not None and session.generations.watches(pipeline,
                                                                                                    explicit=True)
    enable(obj, config, **kwargs)
    try:
        yield
    finally:
        if session is None and is_enabled(obj):
            disable(obj)
        elif session is not None and pipeline is not None and not attached_before:
            session.generations.unwatch_pipeline(pipeline)  # what this block's enable attached


def begin_generation(obj: Any, num_steps: int | None = None, *, guidance: bool | None = None,
                     timesteps: Any = None) -> None:
    """Mark the start of a new generation in a hand-written sampling loop (no-op when caching is off).

    ``num_steps`` is the number of transformer calls per context in the generation; ``RFC(target_nfc=...)``
    needs it, and a generation that runs another number of steps warns at its end. ``guidance`` says whether the
    loop's batched calls carry classifier-free guidance: False keeps CFG-Cache off even when the two halves of a
    batch are equal (two samples of one seed); True or None (default) take an even batch with equal halves for a
    CFG batch. ``timesteps`` (a 1-D sequence or tensor, one per step, as the transformer receives them) lets
    ``enable(..., batch_modulation=True)`` compute every step's modulation up front; ``num_steps`` defaults to its
    length.
    """
    if timesteps is not None:
        try:
            try:
                timesteps = torch.as_tensor(timesteps)
            except ValueError:  # a numpy view with negative strides (np.flip, [::-1]), which torch refuses (review)
                if not callable(getattr(timesteps, "copy", None)):
                    raise
                timesteps = torch.as_tensor(timesteps.copy())
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"timesteps must be a 1-D sequence of numbers or a 1-D tensor, got {timesteps!r}") from e
        if timesteps.ndim != 1 or not len(timesteps) or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise ConfigError(f"timesteps must be a non-empty 1-D sequence of real numbers, got shape "
                              f"{tuple(timesteps.shape)} of {timesteps.dtype}")
        if num_steps is not None and checked_num_steps(num_steps) != len(timesteps):
            raise ConfigError(f"num_steps ({num_steps}) must equal len(timesteps) ({len(timesteps)}), or be omitted")
        num_steps = len(timesteps) if num_steps is None else num_steps
    num_steps = checked_num_steps(num_steps)
    if guidance is not None and not isinstance(guidance, bool):
        raise ConfigError(f"guidance must be True, False or None, got {guidance!r}")
    session = _session(obj)
    if session is not None:
        # a count no plan can take (a target_nfc above it) is refused now, not at the loop's first call (found by
        # review); under context parallelism at the first call, after every process has agreed on the count, so that
        # one process refusing alone does not leave the others waiting in the step's collective (found by review)
        if session.reducer is None:
            session.config.schedule.check_num_steps(num_steps)
        session.generations.begin(num_steps, marked=True, timesteps=timesteps, by_loop=True)  # may be refused
        session.generations.loop_guidance = guidance
        for hook in session.step_hooks:
            hook.forget_calls()


def stats(obj: Any) -> CacheStats:
    """What caching did in the last (or current) generation."""
    session = _session(obj)
    if session is None:
        raise NotEnabledError("relcache is not enabled on this object; nothing to report")
    return session.stats()
