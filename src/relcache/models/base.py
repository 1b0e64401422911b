"""Model adapters: which modules of a transformer to cache and what their input is. They know no method.

A cached module's *input* is the tensor it receives (for DiT: the adaLN-modulated LayerNorm of the residual
stream) and its *output* is what it returns, before the block applies its gate and residual add. The block's
own code keeps running around the module, so gates, norms and residuals are always recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError

# returns the module's input, or a tuple of inputs paired element-wise with a tuple output (dual-stream)
InputFn = Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor | tuple[torch.Tensor, ...]]


def first_tensor_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The module's first positional argument, or its ``hidden_states`` keyword."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError("cannot find the cached module's input: no positional argument and no hidden_states=")


@dataclass(frozen=True)
class CachedModule:
    """One module whose output is cached. Listed in execution order; the first is RCS's probe."""

    name: str
    module: nn.Module
    kind: str  # "attn", "cross_attn" or "mlp"
    input_of: InputFn = first_tensor_input


class Adapter:
    """Base class: subclasses name the model classes they serve and list their cached modules."""

    #: class names served (matched against the model's class and its bases)
    model_classes: tuple[str, ...] = ()
    #: whether the model's pipeline batches classifier-free guidance conditional half first (DiT) rather than
    #: unconditional half first (PixArt, Latte, CogVideoX, ...); CFG-Cache reads it when ``cond_first`` is None
    cfg_cond_first: bool = False

    def matches(self, model: nn.Module) -> bool:
        """True if this adapter serves ``model``."""
        names = {cls.__name__ for cls in type(model).__mro__}
        return any(name in names for name in self.model_classes)

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        """The modules to cache, in execution order."""
        raise NotImplementedError

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The timestep the transformer was called with (used to notice a new generation), or None."""
        return kwargs.get("timestep")

    def shared_modules(self, model: nn.Module) -> list[list[nn.Module]]:
        """Groups of copies of one module that a transformer call calls with the same arguments (DiT's per-block
        timestep-and-class embedding). relcache computes a group once per call where the copies' weights are
        equal (``relcache.shared``). The default: none."""
        return []

    def extra_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this transformer call is an extra call within a step that caching must leave alone (SD3's
        skip-layer guidance pass): it runs as the plain model, counts no step and touches no cache."""
        return False

    def spatial_grid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SpatialGrid | None:
        """For CFG-Cache's 2-D FFT over image space: a pair of functions turning the transformer's output into a
        ``(..., H, W)`` layout and back, for models whose output is a token sequence (FLUX). None (the default):
        the output already ends with its two spatial axes."""
        return None


#: (to the ``(..., H, W)`` layout, back to the model's layout)
SpatialGrid = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Make ``adapter`` available to ``relcache.enable``; later registrations take precedence."""
    _ADAPTERS.insert(0, adapter)
    return adapter


def supported_models() -> list[str]:
    """The model class names some registered adapter serves."""
    return sorted({name for a in _ADAPTERS for name in a.model_classes})


def find_adapter(model: nn.Module, adapter: Adapter | None = None) -> Adapter:
    """The adapter for ``model`` (or ``adapter`` if given), else an error listing what is supported."""
    if adapter is not None:
        return adapter
    for candidate in _ADAPTERS:
        if candidate.matches(model):
            return candidate
    raise UnsupportedModelError(
        f"relcache has no adapter for {type(model).__name__}. Supported models: {', '.join(supported_models())}. "
        "For your own DiT, pass adapter=relcache.models.CustomAdapter(...) (see docs/custom-models.md)."
    )


def modules_of_blocks(
    blocks: Sequence[nn.Module], prefix: str, attrs: Sequence[tuple[str, str]]
) -> list[CachedModule]:
    """Cached modules ``block.<attr>`` of each block, for ``(attr, kind)`` pairs in execution order."""
    out = []
    for i, block in enumerate(blocks):
        for attr, kind in attrs:
            module = getattr(block, attr, None)
            if module is not None:
                out.append(CachedModule(f"{prefix}.{i}.{attr}", module, kind))
    return out
