"""Plumbing shared by every peer: a snapshot that undoes a library's traces, a hook around each transformer call,
and the NFC probe (a forward hook on the last ``Linear`` of the last block's feed-forward)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["CONTEXT", "CountingPeer", "ModelState", "quiet"]

#: the one cache context: the sampler makes one (CFG-batched) transformer call per step
CONTEXT = "batched_cfg"


@contextlib.contextmanager
def quiet(*prefixes: str) -> Iterator[None]:
    """Raise every logger under ``prefixes`` to ERROR for the block (libraries' per-attach chatter)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith(prefixes)]
    loggers = [logging.getLogger(n) for n in (*prefixes, *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _timestep_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The (first) timestep of a DiT call ``model(hidden_states, timestep, class_labels, ...)``."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)


def _blocks(model: nn.Module) -> nn.ModuleList:
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise TypeError(f"{type(model).__name__} has no transformer_blocks: the peers need a diffusers DiT")


def _probe_module(model: nn.Module) -> nn.Module:
    """The last ``Linear`` of the last block's feed-forward: it runs exactly when that block really computes."""
    block = _blocks(model)[-1]
    scope = getattr(block, "ff", block)
    linears = [m for m in scope.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"no Linear layer in the last block of {type(model).__name__}")
    return linears[-1]


class ModelState:
    """A model's modules before a peer attached: ``restore`` removes everything added since.

    Libraries leave traces after their own removal (an empty ``_diffusers_hook`` registry, the original bound
    ``forward`` as an instance attribute, cache-dit's patched DiT ``forward`` and a registered ``_norm1_emb``
    alias, children re-inserted out of order by cache-dit's ``mock.patch`` of the block list), so after removing
    the hooks the snapshot deletes every new instance attribute and child module, restores the children's order
    and puts back a pre-existing instance ``forward``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.attrs = [set(vars(m)) for m in self.modules]
        self.children = [list(m._modules) for m in self.modules]
        self.forwards = [vars(m).get("forward") for m in self.modules]
        self.hooks = [set(r.hooks) if (r := vars(m).get("_diffusers_hook")) is not None else set()
                      for m in self.modules]

    def added_hooks(self) -> list[tuple[nn.Module, str]]:
        """(module, name) of every diffusers hook registered since the snapshot, in registration order."""
        added = []
        for module, before in zip(self.modules, self.hooks, strict=True):
            registry = vars(module).get("_diffusers_hook")
            if registry is not None:
                added += [(module, name) for name in registry.hooks if name not in before]
        return added

    def restore(self) -> None:
        for module, name in reversed(self.added_hooks()):
            module._diffusers_hook.remove_hook(name, recurse=False)
        for module, attrs, children, forward in zip(self.modules, self.attrs, self.children, self.forwards,
                                                    strict=True):
            if list(module._modules) != children:  # drop added children, restore the order (mock.patch reorders)
                kept = {name: module._modules[name] for name in children if name in module._modules}
                module._modules.clear()
                module._modules.update(kept)
            for name in set(vars(module)) - attrs:
                del vars(module)[name]
            if forward is not None:
                vars(module)["forward"] = forward
        for module in self.modules:  # registries that stay: their cached child lists may be stale
            registry = vars(module).get("_diffusers_hook")
            if registry is not None:
                registry.invalidate_child_registries_cache()


class CountingPeer:
    """Shared plumbing of every peer: snapshot, a hook around each transformer call, the NFC probe."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._state: ModelState | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._timestep: float | None = None
        self._calls = 0
        self._ran: set[float] = set()

    # the Peer protocol
    def attach(self, model: nn.Module) -> None:
        if self._state is not None:
            raise RuntimeError(f"{self.label} is already attached to a model; detach it first")
        self._state = ModelState(model)
        try:
            probe = _probe_module(model)
            self._apply(model)
            self._handles = [
                model.register_forward_pre_hook(self._before_call, with_kwargs=True),
                model.register_forward_hook(self._after_call, with_kwargs=True),
                probe.register_forward_hook(self._probe),
            ]
        except BaseException:
            self.detach(model)
            raise

    def before_generation(self, model: nn.Module) -> None:
        self._calls, self._ran, self._timestep = 0, set(), None
        self._reset(model)

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._state is None:
            return
        try:
            self._remove(model)
        finally:
            self._state.restore()
            self._state = None

    def nfc(self, model: nn.Module) -> float:
        """Steps of the last generation at which the last block's feed-forward really ran."""
        return float(len(self._ran))

    def added_hooks(self) -> list[tuple[nn.Module, str]]:
        """(module, name) of every diffusers hook registered since this peer attached (it must be attached)."""
        if self._state is None:
            raise RuntimeError(f"{self.label} is not attached to a model")
        return self._state.added_hooks()

    # what subclasses provide
    def _apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _reset(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _remove(self, model: nn.Module) -> None:
        """Library-side removal; the snapshot restore follows in any case."""

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._timestep = _timestep_of(args, kwargs)
        self._calls += 1
        return None

    def _after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return None

    def _probe(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._ran.add(self._timestep if self._timestep is not None else float(self._calls))
