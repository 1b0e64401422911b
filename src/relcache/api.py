"""The public API: turn caching on and off, mark generations, read what caching did."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import AlreadyEnabledError, ConfigError, NotEnabledError, check_int
from .methods.config import CacheConfig
from .models.base import Adapter, find_adapter
from .runtime import _ATTR, CacheStats, _Controller


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
    model, pipeline = _resolve(obj)
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
        ctrl.attach(pipeline)
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
    if num_steps is not None:  # numpy, 0-d integer tensors and other integral types pass; floats and bools do not
        if isinstance(num_steps, torch.Tensor) and num_steps.numel() == 1 and not num_steps.is_floating_point():
            num_steps = num_steps.item()
        if isinstance(num_steps, numbers.Integral) and not isinstance(num_steps, bool):
            num_steps = int(num_steps)
        check_int("num_steps", num_steps, 1)
    ctrl = _controller(obj)
    if ctrl is not None:
        ctrl.begin_generation(num_steps, marked=True)


def stats(obj: Any) -> CacheStats:
    """What caching did in the last (or current) generation."""
    ctrl = _controller(obj)
    if ctrl is None:
        raise NotEnabledError("relcache is not enabled on this object; nothing to report")
    return ctrl.stats()
