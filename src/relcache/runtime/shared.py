"""Computed once per transformer call: copies of one module that every block calls with the same arguments.

diffusers' DiT gives every block its own copy of the timestep-and-class embedding, and the converted DiT
checkpoints hold the same weights in each copy, so a step computes the same embedding once per block and
once more for the final layer. A cached step skips the attention and feed-forward but still runs those
copies: on a launch-bound GPU they are a large share of a cached step's kernel launches.

An adapter names such copies (``Adapter.shared_modules``). Within one transformer call, a copy called with
the same argument objects as the previous call of its group returns that call's output instead of
recomputing it. This is exact, not a prediction, and it only applies where it cannot change a result:

* only copies whose parameters and buffers are equal to the group's first module's. Equality is checked at
  the first call of each generation (one host sync for all copies), and again whenever a parameter or
  buffer is changed in place or given new storage (its version or data pointer moved); a parameter object
  replaced by another is noticed at the next generation, when the copies' tensors are listed again. Changes
  that move neither the version nor the storage are also noticed only at the next generation: writes through
  ``param.data``, and any in-place write to parameters created under ``torch.inference_mode``, which keep no
  version;
* only with autograd off and the module in eval mode (each copy keeps its own gradients and its dropout);
* never for modules on the meta device or with accelerate hooks (offloading), and never under torch.compile:
  the first call whose whole forward is compiled takes the hooks off for good (``Session.drop_sharing``), as their
  wrappers only added dynamo guards there;
* the call whose FLOPs relcache measures computes every copy, so that full FLOPs are those of the model as
  diffusers runs it, and counts them as executed, since they ran; in later calls a copy not computed is left out of
  the executed FLOPs. So a generation whose calls include a shape's measuring call (the first generation of each
  input shape after ``enable``) executes, and reports, a little more than a later identical one;
* arguments are compared by identity and version (the same tensor, not modified in place; under
  ``torch.inference_mode`` by identity alone, as inference tensors keep no version), and the memo is
  dropped at the end of every transformer call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .attachment import DirectHook


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _equal_flag(first: nn.Module, other: nn.Module) -> torch.Tensor | bool:
    """Whether ``other`` computes what ``first`` computes: False if the structure differs, else a 0-dim bool
    tensor on the parameters' device saying whether every parameter and buffer is equal (not read here, so
    that checking many copies costs one host sync, not one per tensor)."""
    if type(other) is not type(first) or repr(other) != repr(first):
        return False
    a, b = _tensors(first), _tensors(other)
    if [n for n, _ in a] != [n for n, _ in b]:
        return False
    flags = []
    for (_, x), (_, y) in zip(a, b, strict=True):
        if x.is_meta or y.is_meta or x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            return False
        if x is not y:
            flags.append((x == y).all())
    if not flags:
        return True
    if any(f.device != flags[0].device for f in flags):
        return all(bool(f) for f in flags)
    return torch.stack(flags).all()


def _read_flags(flags: list[torch.Tensor | bool]) -> list[bool]:
    """The flags as Python bools, with one host sync for all the tensors on one device."""
    tensors = [f for f in flags if isinstance(f, torch.Tensor)]
    if tensors and all(t.device == tensors[0].device for t in tensors):
        values = iter(torch.stack(tensors).tolist())
        return [next(values) if isinstance(f, torch.Tensor) else f for f in flags]
    return [bool(f) for f in flags]


def _offloaded(module: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in module.modules())


class SharedGroup:
    """One group of copies: which of them equal the first, and the output of the latest call."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = list({id(m): m for m in modules}.values())  # one module object may stand for several copies
        self.members: frozenset[int] = frozenset()  # indexes that compute what modules[0] computes
        self._watched: list[torch.Tensor] | None = None  # every parameter and buffer of the copies, per generation
        self._state: list[tuple[int, int]] | None = None  # their (version, data pointer) when members was computed
        self._verified = False  # signature compared in the current transformer call
        self._memo: tuple[Key, Any, int] | None = None  # (argument key, output, the output's version)
        self.flops: dict[tuple[Any, ...], float] = {}  # FLOPs of one copy, by argument shapes

    def _verify(self) -> None:
        """Recompute the members if this is a new generation or a parameter changed since they were computed.
        Runs once per transformer call: the module tree is walked once per generation, not here."""
        if self._watched is None:
            self._watched = [t for m in self.modules for _, t in _tensors(m)]
            self._state = None
        state = [(_version(t), t.data_ptr()) for t in self._watched]
        if state != self._state:
            first = self.modules[0]
            if _offloaded(first):
                self.members = frozenset()
            else:
                flags = [not _offloaded(m) and _equal_flag(first, m) for m in self.modules]
                self.members = frozenset(i for i, ok in enumerate(_read_flags(flags)) if ok)
            self._state = state
        self._verified = True

    def new_generation(self) -> None:
        """List the copies' tensors and compare them again at the next call."""
        self._watched = None
        self.end_call()

    def end_call(self) -> None:
        """Drop the memo: arguments of the next transformer call are new tensors."""
        self._memo = None
        self._verified = False

    def call(self, index: int, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             ) -> tuple[Any, float]:
        """Module ``index``'s output, and the FLOPs not executed: one copy's when the output is the memo (a
        member repeating the previous arguments), else 0."""
        if not self._verified:
            self._verify()
        key = _key(args, kwargs) if index in self.members else None
        if key is None:
            return forward(*args, **kwargs), 0.0
        memo = self._memo
        if memo is not None and _same_key(memo[0], key) and _version(memo[1]) == memo[2]:
            return memo[1], self.flops.get(_shapes(key), 0.0)
        out = forward(*args, **kwargs)
        self._memo = (key, out, _version(out))
        return out, 0.0


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)
Key = list[tuple[Any, Any, int]]


def _version(out: Any) -> int:
    """A tensor's version counter; -1 for non-tensors and for inference tensors, which keep none (under
    ``torch.inference_mode`` a tensor is matched by identity alone)."""
    return out._version if isinstance(out, torch.Tensor) and not out.is_inference() else -1


def _items(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[int | str, Any]]:
    """Every argument with its position or keyword name, keywords sorted by name."""
    return [*enumerate(args), *sorted(kwargs.items(), key=lambda kv: kv[0])]


def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key | None:
    """(position or name, value, version) of every argument; None if one is neither a tensor nor a plain value."""
    items = _items(args, kwargs)
    if not all(isinstance(v, (torch.Tensor, *_PLAIN)) for _, v in items):
        return None
    return [(k, v, _version(v)) for k, v in items]


def _shapes(key: Key) -> tuple[Any, ...]:
    """What a copy's FLOPs depend on: the arguments' shapes, and the plain values."""
    return tuple((k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v, _ in key)


def _same_key(a: Key, b: Key) -> bool:
    """Same arguments: the same tensor objects at the same versions, and equal plain values."""
    if len(a) != len(b):
        return False
    for (ka, x, vx), (kb, y, vy) in zip(a, b, strict=True):
        if ka != kb:
            return False
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is not y or vx != vy:
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


class SharingHost(Protocol):
    """What a shared copy asks of the runtime."""

    def sharing(self) -> bool:
        """Whether a transformer call is running, so that the memo may be used."""

    def flop_counter_now(self) -> Any:
        """The FlopCounterMode measuring this call, or None."""

    def add_saved_flops(self, flops: float) -> None:
        """A copy was not computed: its FLOPs were not executed."""


class SharedHook(DirectHook):
    """On one copy of a shared group: the group's memo while a transformer call is running."""

    def __init__(self, group: SharedGroup, index: int, host: SharingHost) -> None:
        super().__init__()
        self.group = group
        self.index = index
        self.host = host

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or module.training:
            return forward(*args, **kwargs)
        counter = self.host.flop_counter_now()
        if counter is not None:  # the measured call computes every copy, and notes what one costs
            before = counter.get_total_flops()
            out = forward(*args, **kwargs)
            key = _key(args, kwargs)
            if key is not None:
                self.group.flops[_shapes(key)] = float(counter.get_total_flops() - before)
            return out
        if not self.host.sharing():
            return forward(*args, **kwargs)
        out, saved = self.group.call(self.index, forward, args, kwargs)
        if saved:
            self.host.add_saved_flops(saved)
        return out
