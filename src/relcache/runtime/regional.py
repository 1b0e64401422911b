"""Blocks compiled on their own (regional compilation, diffusers' ``compile_repeated_blocks``): which of a model's
submodules are, and which cached modules sit in them. The session reads it to warn where blocks cannot share their
graphs and to let those modules' hooks pick their step rows by a tensor position (``modules.ModuleSlot``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch import nn


def _blocks_apart(root: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """``root``'s submodules compiled on their own, and their class names: by ``nn.Module.compile`` (as diffusers'
    ``compile_repeated_blocks`` does), wrapped by ``torch.compile``, or with their ``forward`` compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    for module in root.modules():
        if module is root:
            continue
        wrapped = isinstance(module, OptimizedModule)
        forward = module.__dict__.get("forward")  # ``block.forward = torch.compile(block.forward)``
        if (not wrapped and getattr(module, "_compiled_call_impl", None) is None
                and getattr(forward, "_torchdynamo_orig_callable", None) is None):
            continue
        yield module, type(module._orig_mod if wrapped else module).__name__


def compiled_apart(root: nn.Module, cached: list[nn.Module]) -> Counter[str]:
    """Per class name, how many of ``root``'s submodules that hold a cached module are compiled on their own
    (``_blocks_apart``). Dynamo compiles each of them apart; with relcache their graphs are shared between the blocks
    of a class (``cached_apart``), one per kind of step, where each block's needed graphs of its own while the hook
    read the module's index (a constant of its graphs)."""
    ids = {id(m) for m in cached}
    counts: Counter[str] = Counter()
    for module, name in _blocks_apart(root):
        if any(id(m) in ids for m in module.modules()):
            counts[name] += 1
    return counts


def cached_apart(root: nn.Module, cached: list[nn.Module]) -> set[int]:
    """The ids of the ``cached`` modules that sit in a submodule of ``root`` compiled on its own (``_blocks_apart``):
    their hooks pick their step rows by a tensor position, so that blocks share graphs (``modules.ModuleSlot``)."""
    ids = {id(m) for m in cached}
    return {id(m) for block, _ in _blocks_apart(root) for m in block.modules() if id(m) in ids}
