"""Rehearsed first calls: which context's first call of a generation may replay a compiled graph.

A context's first call of a generation records into empty caches, a kind of step of its own. Under torch.compile the
first generation runs it twice, eagerly (the static buffers are made, FLOPs measured) and then compiled; later
generations replay that graph (docs/spec.md, §Capture, "A rehearsed first call"). This file keeps the bookkeeping:
what a graph was made for (``first_call_key``) and while which buffers it stays valid (``StaticCaches.epoch``). When a
first call may be rehearsed, and the rerun itself, stay with the session (``StepCalls._rehearsable``,
``StepCalls.rehearse``): they read and reset its per-generation state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .context import Context


def first_call_key(model: nn.Module, ctx: Context, sig: tuple[Any, ...], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a rehearsed first call's graph and the cache buffers it writes were made for: the context, the call's
    shapes (``sig``), dtypes and devices, the model's dtype and device, the context's storage and its row groups (a
    CFG batch keeps a state per half). A first call that differs in any runs eagerly again (its buffers are made
    there, never in compiled code)."""
    tensors = [*args, *(kwargs[k] for k in sorted(kwargs))]
    kinds = tuple((t.dtype, t.device) for t in tensors if isinstance(t, torch.Tensor))
    param = next(model.parameters(), None)
    held = None if param is None else (param.dtype, param.device)
    return (ctx.name, sig, kinds, held, ctx.storage, tuple(ctx.cfg.group_names()))


class Rehearsals:
    """The first calls whose compiled graph exists, each with the static buffers' epoch it is valid for.

    A graph writes into buffers that fit it while ``StaticCaches.epoch`` is unchanged: a generation of other shapes
    (another batch or resolution, or no CFG batch) makes them anew under the same keys and moves the epoch, and the
    next first call of the earlier shapes then runs eagerly once, making them again. The epoch a first call is valid
    for is the one at the end of the generation that ran it eagerly (``settle``): buffers that generation makes
    later for its own shapes fit it too."""

    def __init__(self) -> None:
        self.valid_for: dict[tuple[Any, ...], int] = {}  # ``first_call_key`` -> epoch
        self.settling: tuple[Any, ...] | None = None  # marked in this generation: its epoch is set at the end
        self.pending: tuple[Any, ...] | None = None  # the running call's key, when it may be rehearsed

    def valid(self, first: tuple[Any, ...] | None, epoch: int) -> bool:
        """Whether ``first``'s graph exists and every buffer it writes still fits."""
        return first is not None and self.valid_for.get(first) == epoch

    def mark(self, first: tuple[Any, ...], epoch: int) -> bool:
        """``first`` ran eagerly and made its buffers (``epoch`` now); True when its graph existed already (a stale
        rehearsal: it need not run again compiled)."""
        stale = first in self.valid_for
        self.valid_for[first] = epoch
        self.settling = first
        return stale

    def settle(self, epoch: int) -> None:
        """The generation ended: the first call marked in it is valid for the buffers it leaves (``epoch``)."""
        if self.settling is not None:
            self.valid_for[self.settling] = epoch
            self.settling = None

    def clear(self) -> None:
        """Forget every rehearsal (the model's modules changed: first calls run eagerly again, to measure)."""
        self.valid_for.clear()
        self.settling = None
