"""Blocks compiled on their own (regional compilation, diffusers' ``compile_repeated_blocks``): which of a model's
submodules are, which cached modules sit in them, and which of those blocks replay CUDA graphs. The session reads it
to let those modules' hooks pick their step rows by a tensor position (``modules.ModuleSlot``) and to warn where
blocks cannot share their graphs or would overwrite relcache's caches."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: the device types on which inductor's CUDA graphs capture a compiled block (a CPU run compiles the same mode without)
CUDA_GRAPH_DEVICES = frozenset({"cuda"})


def _blocks_apart(root: nn.Module) -> Iterator[tuple[nn.Module, str, bool]]:
    """``root``'s submodules compiled on their own, their class names and whether ``torch.compile`` wrapped them: by
    ``nn.Module.compile`` (as diffusers' ``compile_repeated_blocks`` does), wrapped, or with their ``forward``
    compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    for module in root.modules():
        if module is root:
            continue
        wrapped = isinstance(module, OptimizedModule)
        forward = module.__dict__.get("forward")  # ``block.forward = torch.compile(block.forward)``
        if (not wrapped and getattr(module, "_compiled_call_impl", None) is None
                and getattr(forward, "_torchdynamo_orig_callable", None) is None):
            continue
        yield module, type(module._orig_mod if wrapped else module).__name__, wrapped


def compiled_apart(root: nn.Module, cached: list[nn.Module],
                   only: Callable[[nn.Module, bool], bool] | None = None) -> Counter[str]:
    """Per class name, how many of ``root``'s submodules that hold a cached module are compiled on their own
    (``_blocks_apart``; ``only``: those of them it accepts, given the block and whether it is wrapped). Dynamo compiles
    each of them apart; with relcache their graphs are shared between the blocks of a class (``cached_apart``), one per
    kind of step, where each block's needed graphs of its own while the hook read the module's index (a constant of its
    graphs)."""
    ids = {id(m) for m in cached}
    counts: Counter[str] = Counter()
    for module, name, wrapped in _blocks_apart(root):
        if any(id(m) in ids for m in module.modules()) and (only is None or only(module, wrapped)):
            counts[name] += 1
    return counts


def cached_apart(root: nn.Module, cached: list[nn.Module]) -> set[int]:
    """The ids of the ``cached`` modules that sit in a submodule of ``root`` compiled on its own (``_blocks_apart``):
    their hooks pick their step rows by a tensor position, so that blocks share graphs (``modules.ModuleSlot``)."""
    ids = {id(m) for m in cached}
    return {id(m) for block, _, _ in _blocks_apart(root) for m in block.modules() if id(m) in ids}


def _compile_context(module: nn.Module, wrapped: bool) -> Any:
    """The dynamo context ``module`` was compiled with (``_blocks_apart``'s three ways), or None where it cannot be
    read: the compiled callable keeps it in its closure (private torch objects, read defensively)."""
    if wrapped:
        return getattr(module, "dynamo_ctx", None)
    fn = module.__dict__.get("forward")
    if getattr(fn, "_torchdynamo_orig_callable", None) is None:
        fn = getattr(module, "_compiled_call_impl", None)
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    return None


def _replays_cuda_graphs(module: nn.Module, wrapped: bool) -> bool:
    """Whether ``module`` was compiled to replay CUDA graphs: ``mode="reduce-overhead"`` or ``"max-autotune"`` (both
    set inductor's ``triton.cudagraphs``), that option given directly, inductor's global setting, or the
    ``"cudagraphs"`` backend. False where torch's private objects do not tell."""
    try:
        from torch._dynamo.eval_frame import innermost_backend

        ctx = _compile_context(module, wrapped)
        backend = None if ctx is None else innermost_backend(ctx.callback)
    except (ImportError, AttributeError, AssertionError):  # pragma: no cover - other torch versions
        return False
    if backend is None:
        return False
    if getattr(backend, "compiler_name", None) == "cudagraphs":
        return True
    config = getattr(backend, "config", None)
    if isinstance(config, dict) and "triton.cudagraphs" in config:
        return bool(config["triton.cudagraphs"])
    return type(backend).__name__ == "_TorchCompileInductorWrapper" and bool(torch._inductor.config.triton.cudagraphs)


def captured_apart(root: nn.Module, cached: list[nn.Module]) -> Counter[str]:
    """Per class name, how many of ``root``'s submodules that hold a cached module are compiled on their own to
    replay CUDA graphs (``compile_repeated_blocks(mode="reduce-overhead")``). relcache holds a block's records between
    steps out of place there (the step is not compiled, so no static caches): they are outputs of the block's graph,
    whose next replay writes where they are."""
    return compiled_apart(root, cached, _replays_cuda_graphs)
