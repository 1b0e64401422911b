"""Model adapters: which modules of a transformer to cache and what their input is. They know no method.

A cached module's *input* is the tensor it receives (for DiT: the adaLN-modulated LayerNorm of the residual
stream) and its *output* is what it returns, before the block applies its gate and residual add. The block's
own code keeps running around the module, so gates, norms and residuals are always recomputed.

Here too: the registry (``register_adapter``, ``find_adapter``, ``supported_models``) and what several adapters share
(block tables, the joint two-stream input, ``modules_of_blocks``, the feed-forward-chunking guard). An adapter file
imports only this module from the models package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError

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


# -- what adapters share: block tables, input functions, module lists ----------------------------------------------

#: ``(attr, kind)`` pairs in execution order, per kind of block. diffusers' ``BasicTransformerBlock`` (DiT, PixArt,
#: Latte's spatial blocks): self-attention, cross-attention (absent in DiT's blocks), feed-forward.
BASIC_BLOCK_MODULES = (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "mlp"))
#: dual-stream blocks (FLUX, HunyuanVideo): the joint attention, then the image (video) and text MLPs
DUAL_BLOCK_MODULES = (("attn", "attn"), ("ff", "mlp"), ("ff_context", "mlp"))
#: single-stream blocks (FLUX, HunyuanVideo): ``proj_mlp`` runs before ``attn``
SINGLE_BLOCK_MODULES = (("proj_mlp", "mlp"), ("attn", "attn"))

#: ``(blocks, prefix, (attr, kind) pairs)``: one kind of block of a model, its cached modules and their names' prefix
BlockGroup = tuple[Sequence[nn.Module], str, Sequence[tuple[str, str]]]


def joint_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a joint (two-stream) attention, ``(hidden_states, encoder_hidden_states)`` by keyword or position,
    paired element-wise with its ``(image_out, text_out)`` (FLUX, SD3, HunyuanVideo, CogVideoX)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if "encoder_hidden_states" in kwargs:
        return hidden, kwargs["encoder_hidden_states"]
    return hidden, args[0 if "hidden_states" in kwargs else 1]


def with_joint_inputs(modules: list[CachedModule], attrs: tuple[str, ...] = ("attn",)) -> list[CachedModule]:
    """``modules`` with the joint attentions named ``attrs`` taking both streams as inputs (paired with outputs)."""
    return [replace(m, input_of=joint_inputs) if m.name.rsplit(".", 1)[-1] in attrs else m for m in modules]


def modules_of_layers(*groups: BlockGroup) -> list[CachedModule]:
    """Cached modules ``<prefix>.<i>.<attr>`` of several kinds of blocks that alternate layer by layer (Latte: spatial
    block ``i``, then temporal block ``i``): layer ``i`` of each group in turn, its ``(attr, kind)`` pairs in order.
    Attributes a block lacks (or holds as None) are skipped; groups of different lengths are a ``ValueError``."""
    out = []
    for i, layer in enumerate(zip(*(blocks for blocks, _, _ in groups), strict=True)):
        for block, (_, prefix, attrs) in zip(layer, groups, strict=True):
            for attr, kind in attrs:
                module = getattr(block, attr, None)
                if module is not None:
                    out.append(CachedModule(f"{prefix}.{i}.{attr}", module, kind))
    return out


def modules_of_blocks(
    blocks: Sequence[nn.Module], prefix: str, attrs: Sequence[tuple[str, str]]
) -> list[CachedModule]:
    """Cached modules ``block.<attr>`` of each block, for ``(attr, kind)`` pairs in execution order."""
    return modules_of_layers((blocks, prefix, attrs))


def dual_then_single_stream_modules(model: nn.Module, joint_single: bool) -> list[CachedModule]:
    """FLUX's and HunyuanVideo's layout: ``transformer_blocks`` (dual-stream, the joint attention taking both streams)
    then ``single_transformer_blocks``, whose ``attn`` also takes both streams where ``joint_single`` (HunyuanVideo)."""
    dual = modules_of_blocks(model.transformer_blocks, "transformer_blocks", DUAL_BLOCK_MODULES)
    single = modules_of_blocks(model.single_transformer_blocks, "single_transformer_blocks", SINGLE_BLOCK_MODULES)
    return with_joint_inputs(dual) + (with_joint_inputs(single) if joint_single else single)


def refuse_ff_chunking(blocks: Iterable[nn.Module]) -> None:
    """ConfigError if a block chunks its feed-forward (diffusers' ``set_chunk_feed_forward``, which the models'
    ``enable_forward_chunking`` calls): the block then calls ``ff`` once per chunk, not once per step."""
    if any(getattr(block, "_chunk_size", None) is not None for block in blocks):
        raise ConfigError(
            "feed-forward chunking (set_chunk_feed_forward / enable_forward_chunking) calls ff several times per "
            "step; disable it (disable_forward_chunking, or chunk_size=None) before enabling relcache"
        )
