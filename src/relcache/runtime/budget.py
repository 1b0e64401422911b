"""A cache-memory budget (``CacheConfig.max_cache_bytes``): which storage fits, known before any module runs.

At the first call of a context in a generation the transformer's forward runs once on fake tensors (shapes only,
no computation, no memory), and each cached module's input and output shapes are read there. The bytes every
storage of ``STORAGE_LADDER`` would hold once the histories are full (``Predictor.state_bytes``, plus RCS's input
history) follow, and the first storage within the budget is used for that context's generation.

(choice) Split CFG runs two call contexts ("cond" and "uncond"), each with its own caches. A context's storage is
chosen when it first runs, counting what the contexts already running will hold and, as much again, each context
of the session's previous generation not yet running (in the first generation, none is known: "uncond" then
gets what "cond" left). CFG-Cache's own deltas are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._pytree import tree_map_only

from ..errors import ConfigError
from ..methods.config import STORAGE_LADDER, CacheConfig
from ..methods.storage import CacheStorage, share_key
from ..models.base import CachedModule
from .accounting import signature

#: per cached module, in call order: (its inputs' shapes, its outputs' shapes, the outputs' dtype, which tensor each
#: input is: equal numbers are the same tensor, as ``storage.share_key`` tells it, which RFE stores once)
ModuleShapes = dict[int, tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], torch.dtype, tuple[int, ...]]]


class ShapeProbe:
    """Collects cached modules' shapes, and which of their inputs are the same tensor, while the forward runs on fake
    tensors."""

    def __init__(self) -> None:
        self.shapes: ModuleShapes = {}
        self._tensors: dict[tuple[Any, ...], int] = {}  # share key -> tensor number
        self._alive: list[torch.Tensor] = []  # the keyed base tensors, kept alive so that no identity is reused

    def _number(self, x: torch.Tensor) -> int:
        got = share_key(x)
        if got is None:  # no version counter: never shared (``SharedInputs``)
            got = ((object(),), x)  # a key equal to no other
        self._alive.append(got[1])
        return self._tensors.setdefault(got[0], len(self._tensors))

    def run(self, idx: int, spec: CachedModule, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ins = spec.inputs(args, kwargs)
        out = original(*args, **kwargs)
        numbers = tuple(self._number(x) for x in ins)  # after the module ran, as the runtime stores them
        outs = spec.outputs(out)
        self.shapes[idx] = (tuple(tuple(x.shape) for x in ins), tuple(tuple(o.shape) for o in outs), outs[0].dtype,
                            numbers)
        return out


def probe_shapes(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 set_probe: Callable[[ShapeProbe | None], None]) -> ModuleShapes:
    """Run ``forward`` on fake copies of its tensor arguments with a ``ShapeProbe`` installed (``set_probe``)."""
    probe = ShapeProbe()
    set_probe(probe)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fargs, fkwargs = tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
            forward(*fargs, **fkwargs)
    except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as e:
        # e.g. diffusers' ContextParallelConfig(ulysses_anything=True), which reads the slices' sizes (.item())
        raise ConfigError(
            "max_cache_bytes sizes the caches from one run of the forward on fake tensors (shapes only), and this "
            f"model's forward cannot run so ({type(e).__name__}: {str(e).splitlines()[0][:160]}): give "
            "cache_dtype=... instead of max_cache_bytes") from e
    finally:
        set_probe(None)
    return probe.shapes


def cache_bytes(config: CacheConfig, shapes: ModuleShapes, storage: CacheStorage | None,
                compiled: bool = False) -> int:
    """Bytes one context's caches hold with full histories under ``storage``: every cached module's predictor
    states (an input that two states read is stored once; ``compiled``: with what compiled records add) and, for RCS,
    the input history of the first cached module (stored as computed)."""
    predictor, total, stored = config.predictor, 0, set()
    for ins, outs, dtype, numbers in shapes.values():
        for j, out in enumerate(outs):
            k = j if len(ins) == len(outs) else 0
            total += predictor.state_bytes(out, ins[k], dtype, storage, input_shared=numbers[k] in stored)
            total += predictor.compiled_bytes(out, dtype) if compiled else 0
            stored.add(numbers[k])
    history_order = getattr(config.schedule, "order", None)
    if config.schedule.uses_input and history_order is not None and shapes:
        ins, _, dtype, _ = shapes[min(shapes)]
        numel = 1
        for n in ins[0]:
            numel *= n
        total += (history_order + 1) * numel * dtype.itemsize
    return total


def choose_storage(config: CacheConfig, shapes: ModuleShapes, held: int, pending: int, compiled: bool = False
                   ) -> tuple[CacheStorage | None, int]:
    """The first storage of ``STORAGE_LADDER`` for a new context, and the bytes it will hold, such that ``held`` (what
    the generation's other contexts will hold) plus this context's caches, counted ``1 + pending`` times (contexts
    expected later in the generation), fit ``config.max_cache_bytes``; a ConfigError naming the smallest need when
    none fits. ``compiled``: the context's calls run compiled (``cache_bytes``)."""
    budget = config.max_cache_bytes
    as_computed = getattr(config.predictor, "computed_only", False)  # no other storage to fall back on
    needs = []
    for storage in STORAGE_LADDER[:1] if as_computed else STORAGE_LADDER:
        need = cache_bytes(config, shapes, storage, compiled)
        if held + need * (1 + pending) <= budget:
            return storage, need
        needs.append(held + need * (1 + pending))
    others = f" with {held} bytes held by the generation's other call contexts" if held else ""
    others += f", counting {pending} more call context(s) like this one" if pending else ""
    if as_computed:  # found by review: the refusal named an int8 storage this predictor cannot use
        raise ConfigError(
            f"max_cache_bytes={budget} is too small for {config.label} at these shapes{others}: "
            f"{type(config.predictor).__name__} keeps its caches as computed, which needs {needs[0]} bytes "
            f"({_readable(needs[0])}); raise max_cache_bytes or cache fewer modules (CacheConfig.modules)")
    raise ConfigError(
        f"max_cache_bytes={budget} is too small for {config.label} at these shapes{others}: the smallest storage "
        f"({STORAGE_LADDER[-1].label}) needs {needs[-1]} bytes ({_readable(needs[-1])}), caches as computed "
        f"{needs[0]} bytes; raise max_cache_bytes, cache fewer modules (CacheConfig.modules), or lower the order"
    )


def _readable(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at 1 or more (GiB, MiB or KiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.2f} KiB"


class CacheBudget:
    """A session's ``max_cache_bytes``: the storage of each new call context, from the cached modules' shapes (one
    fake-tensor run per call signature, remembered) and what the generation's other contexts hold or will hold."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.probe: ShapeProbe | None = None  # set while the forward runs on fake tensors
        self._shapes: dict[tuple[Any, ...], ModuleShapes] = {}  # call signature -> cached modules' shapes
        self._last: set[str] = set()  # the call contexts of the previous generation
        self._by_kind: dict[Hashable, set[str]] = {}  # those of the latest generation of each kind (``choose``)
        self._kind: Hashable = None  # the kind of the generation running, said at its first choice
        self._asked: set[str] = set()  # the call contexts that asked for a storage in this generation

    def end_generation(self, contexts: Mapping[str, Any]) -> None:
        """Remember the contexts of the generation that ended (kept when it ran none), those whose storage could not
        be chosen included: a context that found too little left must be counted from the next generation's start
        (before, it was never counted and failed in every generation)."""
        ran = set(contexts) | self._asked
        if ran:
            self._last = self._by_kind[self._kind] = ran
        self._asked = set()

    def choose(self, name: str, planned: Mapping[str, int], modules: list[CachedModule], expert: Hashable,
               forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], compiled: bool = False,
               kind: Hashable = None) -> tuple[CacheStorage | None, int]:
        """The storage of context ``name`` and the bytes it will hold (``choose_storage``); ``planned`` holds the
        bytes planned by the generation's running contexts (``name``'s own is not counted: an expert switch chooses
        again), ``expert`` the running expert where several transformers run in turn, ``compiled`` whether the
        forward is compiled, ``kind`` what the calling pipeline says of its guidance (``Generations.call_kind``).

        (choice) The contexts still to come are those the latest generation of the same kind ran (else the latest
        generation's): a server mixing guided and unguided requests of a split-CFG pipeline (Wan: "cond" and
        "uncond" calls) gave identical requests different storages, hence images, or failed them, by the previous
        request's kind (found by review)."""
        if self.config.max_cache_bytes is None:
            return self.config.storage, 0
        if not self._asked:  # the generation's first context: its kind
            self._kind = kind
        # the bytes depend on the dtypes too: the arguments', and the cached modules' (the model may be cast after
        # ``enable``; a shapes-only key kept the first dtype's bytes and went over the budget)
        tensors = (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        sig = (signature(args, kwargs), tuple(a.dtype for a in tensors),
               frozenset(p.dtype for spec in modules for p in spec.module.parameters()), expert)
        if sig not in self._shapes:
            self._shapes[sig] = probe_shapes(forward, args, kwargs, self._set_probe)
        held = sum(n for other, n in planned.items() if other != name)
        last = self._by_kind.get(self._kind, self._last)
        pending = len(last - set(planned) - {name})
        newcomer = bool(held) and name not in last and name not in planned  # others chose without counting it
        self._asked.add(name)
        try:
            return choose_storage(self.config, self._shapes[sig], held, pending, compiled)
        except ConfigError as e:
            if not newcomer:
                raise
            raise ConfigError(f"{e}. The call context {name!r} started after the generation's other contexts had "
                              "chosen their storage without counting it (it did not run in the latest generation "
                              "of this kind, guidance on or off); the next such generation counts it from the start, "
                              "so running again may fit") from None

    def _set_probe(self, probe: ShapeProbe | None) -> None:
        self.probe = probe
