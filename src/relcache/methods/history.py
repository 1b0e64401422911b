"""Shared numerics of the predictors and schedules: per-sample norms and divided differences.

Symbols and formulas: ``docs/spec.md``, §Notation and §Taylor forecast. The two latest full steps are ``a``
(latest) and ``b``, ``N = a - b`` and ``k = i - a`` for a cached step ``i``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .storage import HALF_MAX, CacheStorage, Held, held_bytes, load, owned, store


class Reducer(Protocol):
    """Sums per-sample partial sums over the processes that each hold a slice of the sequence (context parallelism:
    ``relcache.runtime.distributed.SequenceReducer``), so that a norm over tokens is the whole sequence's norm."""

    def sum(self, partials: torch.Tensor) -> torch.Tensor:
        """``partials`` ``(k, batch)`` of this process's slice -> their sums over every slice (one collective)."""

    def later(self, partials: torch.Tensor, done: Callable[[torch.Tensor], None]) -> None:
        """Sum ``partials`` in the next collective instead of one of their own, then hand the sums to ``done``."""


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sample_norm(x: torch.Tensor, p: float = 2.0, reducer: Reducer | None = None) -> torch.Tensor:
    """Per-sample p-norm over all non-batch dimensions, shape ``(batch,)``: in float32, or in float64 for a float64
    ``x`` (which float32 cannot hold without narrowing). With a ``reducer``, over the whole sequence (``sample_norms``).

    (choice) Norms are per sample so that samples of one batch, and the two CFG halves, never mix.
    """
    if reducer is not None:
        return sample_norms([x], p, reducer)[0]
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), ord=p, dim=1, dtype=_norm_dtype(x))


def power_sums(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample ``sum |x|^p`` over all non-batch dimensions in ``sample_norm``'s precision, shape ``(batch,)``: the
    partial sums that add up over the slices of a split sequence (``Reducer``)."""
    n = sample_norm(x, p)
    return n if p == 1 else n.pow(p)


def roots(sums: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The p-norms of the ``power_sums`` ``sums``."""
    return sums if p == 1 else sums.pow(1 / p)


def sample_norms(xs: Sequence[torch.Tensor], p: float = 2.0, reducer: Reducer | None = None) -> list[torch.Tensor]:
    """``sample_norm`` of each of ``xs`` (equal batch sizes). With a ``reducer``, each over the whole sequence: every
    ``power_sums`` goes into one sum over the slices, then the roots; without one, exactly ``sample_norm``'s."""
    if reducer is None:
        return [sample_norm(x, p) for x in xs]
    dtype = torch.float64 if any(_norm_dtype(x) == torch.float64 for x in xs) else torch.float32
    sums = reducer.sum(torch.stack([power_sums(x, p).to(dtype) for x in xs]))
    return list(roots(sums, p).unbind(0))


def sample_relative_l1(error: torch.Tensor, ref: torch.Tensor, reducer: Reducer | None = None) -> torch.Tensor:
    """Per-sample relative L1 ``‖error‖₁ / ‖ref‖₁`` in ``sample_norm``'s precision, shape ``(batch,)``; ``error`` is the
    difference already formed (callers may build it in place). A zero ``ref`` divides by the smallest float32.
    With a ``reducer``, both norms over the whole sequence, in one sum."""
    num, den = sample_norms([error, ref], 1, reducer)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def relative_l1(x: torch.Tensor, ref: torch.Tensor, reducer: Reducer | None = None) -> float:
    """Mean over samples of ``‖x - ref‖₁ / ‖ref‖₁``: the error measure of RCS, ``record_errors`` and the bench."""
    return float(sample_relative_l1(x - ref, ref, reducer).mean())


def _eager_no_grad() -> bool:
    """Whether a forecast may write into tensors it made itself: eager code without autograd (compiled code keeps the
    out-of-place form its graphs were traced with; autograd refuses ``out=`` on tensors that need grad)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


def narrowed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype``; into float16 from a wider dtype, clamped to float16's finite range first (a
    coefficient past 65504 was inf, and inf times a zero element NaN: found by review). NaN stays NaN. Other casts
    are plain: bfloat16 and float32 have float32's range, and only float64 work holds float64 numbers."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-HALF_MAX, HALF_MAX)
    return x.to(dtype)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(batch,)`` vector so it broadcasts over ``like`` sample by sample, in ``like``'s dtype
    (``narrowed``: finite in float16 where ``v`` is finite)."""
    return narrowed(v.reshape(v.shape[0], *([1] * (like.ndim - 1))), like.dtype)


def finite(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` is finite. Eager: ``x * 0 == 0``, two kernels where ``isfinite`` launches four. Compiled:
    ``isfinite``, which inductor fuses anyway, because inductor simplifies ``x * 0`` to ``0`` and so turns the eager
    form into ``True`` everywhere, dropping every fallback it guards."""
    return torch.isfinite(x) if torch.compiler.is_compiling() else x * 0 == 0


#: the highest order of divided differences a predictor or schedule may keep
MAX_ORDER = 4
#: where a step row keeps the step's weight (``Linear``); before it, the Horner multipliers ``k/1 .. k/MAX_ORDER``
ROW_WEIGHT = MAX_ORDER


def step_row(k: int, weight: float = 0.0) -> list[float]:
    """The numbers a forecast ``k`` steps after the latest full step needs, in the order a step row holds them:
    ``[k, k/2, ..., k/MAX_ORDER, weight]``. The runtime turns each step's rows into one tensor, so compiled code
    reads them as data and never specialises on ``k``."""
    return [k / (j + 1) for j in range(MAX_ORDER)] + [weight]


def numbers_on(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Host numbers as a tensor on ``device`` without making the host wait for the device: on a GPU through pinned
    memory and an asynchronous copy (a copy from ordinary memory synchronises). ``dtype`` float64 for float64 work,
    so that no multiplier is rounded to float32. ``values`` may be a host tensor of ``dtype`` already
    (``host_numbers``): it is then never written into, nor returned itself."""
    if isinstance(values, torch.Tensor):
        t = values
        if device.type == "cpu":
            return t.clone()
    else:
        t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def host_numbers(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a host tensor of ``dtype`` for ``numbers_on`` or ``StaticCaches.put_numbers`` to ``device``
    (pinned when that is a GPU), made once and then only read."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if device.type == "cuda" else t


def row_dtype(like: torch.dtype) -> torch.dtype:
    """The dtype of step rows for work in ``like``: float64 for float64, else float32."""
    return torch.float64 if like == torch.float64 else torch.float32


class DiffHistory:
    """Divided differences ``D_0 .. D_m`` of one tensor sequence, taken at full steps.

    ``D_0 = X(a)`` and ``D_j(a) = (D_{j-1}(a) - D_{j-1}(b)) / N``; order ``j`` exists only once order
    ``j-1`` existed at ``b``, so the order grows as full steps accumulate. ``dtype`` optionally stores the
    differences in lower precision (memory): a dtype for every order, or a ``storage.CacheStorage`` (its ``base``
    format for ``D_0``, ``diffs`` for the others, narrow formats scaled); arithmetic is done in the incoming tensor's
    dtype. Step numbers are not kept here: the caller passes the gap ``N`` (a 0-d tensor) to ``update`` and a step
    row (``step_row``) to the forecasts.
    """

    __slots__ = ("max_order", "dtype", "storage", "diffs", "gap", "seen")

    def __init__(self, max_order: int, dtype: torch.dtype | CacheStorage | None = None) -> None:
        self.max_order = max_order
        self.dtype = dtype
        self.storage = CacheStorage.of(dtype)
        self.diffs: list[torch.Tensor | Held] = []  # as stored: tensors, or ``Held`` for scaled formats
        self.gap: torch.Tensor | None = None  # N = a - b, 0-d
        # D_0 where it is the very tensor recorded (held as computed): it, weakly, and its version then
        self.seen: tuple[weakref.ref, int] | None = None

    def update(self, value: torch.Tensor, gap: torch.Tensor | None, change: torch.Tensor | None = None) -> None:
        """Record ``value`` observed at a full step ``gap`` steps after the previous record (None: the first).
        ``change``, when given, is ``value - D_0`` already formed by the caller (RFE takes its norm) and no longer
        needed: ``D_1`` is divided into it in place instead of forming it again (the same numbers, one pass less)."""
        new = [value]
        if gap is not None and self.diffs and self.diffs[0].shape == value.shape:
            for j in range(1, self.max_order + 1):
                if j - 1 >= len(self.diffs):
                    break
                if j == 1 and change is not None:
                    new.append(change.div_(gap))
                else:
                    new.append((new[j - 1] - self.get(j - 1, value.dtype)) / gap)
            self.gap = gap
        else:  # first record, or the shape changed: start over
            self.gap = None
        self._keep(new, value)

    def _keep(self, new: list[torch.Tensor], value: torch.Tensor, offload: bool = True) -> None:
        """Hold ``new`` (``D_0 = value`` first) in the storage's formats, and remember ``D_0``'s version where it is
        ``value`` itself (``changed_in_place``); ``offload`` False keeps even an offloading storage's tensors here."""
        st = self.storage
        self.diffs = [owned(value), *new[1:]] if st is None else [
            store(d, st.diffs if j else st.base, st.scale, st.offload and offload) for j, d in enumerate(new)]
        base = self.diffs[0]
        aliased = base is value and not torch.compiler.is_compiling() and not value.is_inference()
        self.seen = (weakref.ref(value), value._version) if aliased else None  # noqa: SLF001

    def changed_in_place(self) -> bool:
        """Whether ``D_0``, held as the very tensor recorded, was written in place since. relcache never writes into
        it; a model that does (``out.mul_(gate)`` on a cached module's output) would change the cache it reads back
        at cached steps. Eager only (compiled code cannot read versions); inference tensors have none."""
        seen = self.seen
        if seen is None or torch.compiler.is_compiling():
            return False
        base = self.diffs[0]
        return seen[0]() is base and base._version != seen[1]  # noqa: SLF001

    def get(self, j: int, like: torch.dtype) -> torch.Tensor:
        """``D_j`` in dtype ``like``."""
        return load(self.diffs[j], like)

    @property
    def ready(self) -> bool:
        """True once a value was recorded, i.e. a forecast is possible."""
        return len(self.diffs) > 0  # not bool(list): torch 2.11's dynamo cannot trace that

    @property
    def nbytes(self) -> int:
        """Bytes of the stored differences (their scales included)."""
        return sum(held_bytes(d) for d in self.diffs)

    @property
    def order(self) -> int:
        """The highest order available now (0 after one full step)."""
        return len(self.diffs) - 1

    def base(self, like: torch.dtype) -> torch.Tensor:
        """``D_0 = X(a)`` in dtype ``like``."""
        return self.get(0, like)

    def direction(self, row: torch.Tensor, like: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """``u`` with ``k · u`` the Taylor increment ``sum_{j>=1} D_j k^j / j!``, or None while only ``D_0`` exists.

        Horner form, ``u = D_1 + k/2 (D_2 + k/3 (D_3 + ...))``, with the multipliers ``k/(j+1) = row[j]``: one fused
        multiply-add per order above 1. At order 1 ``u`` may be ``D_1`` itself: check ``is_stored`` before writing
        into it. ``out``, a tensor of ``u``'s shape and dtype, receives ``u`` from order 2 on (a buffer the caller no
        longer needs: no fresh allocation, which on a CPU page-faults).
        """
        if len(self.diffs) < 2:
            return None
        mults = self.multipliers(row)
        u = self.get(len(self.diffs) - 1, like)
        reuse = out is None and _eager_no_grad()
        for j in range(len(self.diffs) - 2, 0, -1):  # u <- D_j + k/(j+1) · u
            if out is None and reuse and j < len(self.diffs) - 2:  # u is this call's own fresh tensor: write into it
                out = u
            u = torch.addcmul(self.get(j, like), mults[j - 1], u) if out is None else torch.addcmul(
                self.get(j, like), mults[j - 1], u, out=out)
        return u

    def multipliers(self, row: torch.Tensor) -> list[torch.Tensor]:
        """The Horner multipliers of ``direction`` at the current order ``m``: ``u = D_1 + c_1 (D_2 + c_2 (...))``
        with ``c_j = k/(j+1) = row[j]``, ``j = 1 .. m-1``."""
        return [row[j] for j in range(1, len(self.diffs) - 1)]

    def hold_extra(self, static: StaticCaches, key: object, gap_like: torch.Tensor, reserve: bool) -> None:
        """Move what a subclass holds besides its differences and latest gap into ``static``'s buffers under ``key``
        (``StaticCaches.hold_history``; ``reserve``: outside compiled code, allocate them for every order now). The
        spec's form holds nothing else."""
        return None

    def gram(self, like: torch.dtype) -> torch.Tensor | None:
        """Per sample, the inner products ``<D_i, D_j>`` of ``D_1 .. D_m`` (``(batch, m, m)``, in ``sample_norm``'s
        precision), or None while only ``D_0`` exists: with it ``direction_norm`` gives ``‖u‖`` at any step without
        reading the differences again. Taken once per full step; compiled code fuses it with the record."""
        m = len(self.diffs) - 1
        if m < 1:
            return None
        flat = [self.get(j, like).reshape(self.diffs[0].shape[0], -1) for j in range(1, m + 1)]
        dt = _norm_dtype(flat[0])
        dots = {(i, j): (flat[i].to(dt) * flat[j].to(dt)).sum(1) for i in range(m) for j in range(i, m)}
        return torch.stack([torch.stack([dots[min(i, j), max(i, j)] for j in range(m)], 1) for i in range(m)], 1)

    def direction_norm(self, gram: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """``sample_norm(direction(row, ...))`` from ``gram`` (this history's ``gram`` at its current order), exactly in
        exact arithmetic: ``‖u‖² = cᵀ G c`` with ``c = (1, c_1, c_1 c_2, ...)`` the products of the Horner multipliers.
        (choice) A rounding below zero (``u`` almost cancelling) gives 0, which RFE's fallback turns into Taylor."""
        c = [torch.ones((), dtype=gram.dtype, device=gram.device)]
        for mult in self.multipliers(row):
            c.append(c[-1] * mult.to(gram.dtype))
        cv = torch.stack(c)
        return torch.einsum("i,bij,j->b", cv, gram, cv).clamp_min(0).sqrt()

    def is_stored(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is one of the stored differences (so must not be written into)."""
        return any(t is d for d in self.diffs)

    def taylor(self, row: torch.Tensor, like: torch.dtype) -> torch.Tensor:
        """The Taylor forecast ``sum_{j>=0} D_j k^j / j!`` (reuse while only ``D_0`` exists).

        Eager and without autograd, the sum is written over the direction where that is this call's own tensor (not a
        stored difference): one fresh full-size tensor per forecast instead of two, the same numbers (on a CPU each
        fresh one page-faults). Compiled code and autograd get the out-of-place form."""
        u = self.direction(row, like)
        base = self.base(like)
        if u is None:
            return base
        if _eager_no_grad() and not self.is_stored(u) and u.dtype == base.dtype and u.shape == base.shape:
            return torch.addcmul(base, row[0], u, out=u)
        return torch.addcmul(base, row[0], u)


class StaticCaches:
    """Persistent tensors at stable addresses, one per key, that caches are copied into in place: what CUDA graphs
    (``torch.compile(mode="reduce-overhead")``) need of every tensor a cache holds from one step to the next
    (docs/spec.md, §Capture).

    ``put(key, value)`` copies ``value`` into the key's buffer and returns the buffer; the buffer is allocated (and
    marked a static input for dynamo and cudagraph trees) when the key is new or ``value``'s shape, dtype or device
    differ from it, so a cache of unchanged shape keeps its address step after step and generation after
    generation. A buffer is allocated only outside compiled code: inside it, a missing buffer leaves ``value`` as is
    (held out of place: correct, but that graph then outputs a tensor the cache keeps, which CUDA graphs cannot
    replay safely). The runtime runs the first call of each shape eagerly, where every buffer is reserved.
    """

    __slots__ = ("buffers", "_reserved", "epoch")

    def __init__(self) -> None:
        self.buffers: dict[object, torch.Tensor] = {}
        self._reserved: dict[object, tuple] = {}  # history key -> the (shape, dtype, device) its buffers were made for
        # counts the buffers replaced (another shape, dtype or device under a key) or dropped: a graph compiled while
        # the epoch was e writes into buffers that all still fit while it is e (``Session`` checks its first calls)
        self.epoch = 0

    def _buffer(self, key: object, like: torch.Tensor) -> torch.Tensor | None:
        return self._buffer_for(key, like.shape, like.dtype, like.device)

    def _buffer_for(self, key: object, shape: torch.Size, dtype: torch.dtype, device: torch.device
                    ) -> torch.Tensor | None:
        buf = self.buffers.get(key)
        if buf is not None and buf.shape == shape and buf.dtype == dtype and buf.device == device:
            return buf
        if torch.compiler.is_compiling():
            return None
        if buf is not None:
            self.epoch += 1
        # a normal tensor even inside ``torch.inference_mode()``: buffers outlive the generation, and a later one run
        # outside that mode could not write into an inference tensor
        with torch.inference_mode(False):
            buf = torch.empty(shape, dtype=dtype, device=device)
        # unguarded: dynamo does not recompile on the address; cudagraph trees treat it as a static input, so
        # writing into it inside a graph is allowed and replays read it without a copy
        torch._dynamo.mark_static_address(buf, guard=False)
        self.buffers[key] = buf
        return buf

    def put(self, key: object, value: torch.Tensor) -> torch.Tensor:
        """``value`` copied into ``key``'s buffer (the buffer returned), or ``value`` itself where none can be made."""
        buf = self._buffer(key, value)
        if buf is None:
            return value
        if buf is not value:
            buf.copy_(value)
        return buf

    def detach(self) -> None:
        """Drop the autograd history the buffers took from values written under autograd (a loop without
        ``torch.no_grad()``), in place, at their addresses: they outlive the generation, and each write chained onto
        the last, so the graph (saved activations included) grew generation after generation, and buffers that
        needed a gradient made the next generation recompile (found by review, 2026-12-04)."""
        for buf in self.buffers.values():
            if buf.grad_fn is not None or buf.requires_grad:
                buf.detach_()

    def hold(self, key: object, t: torch.Tensor | Held | None) -> torch.Tensor | Held | None:
        """``put`` for a stored tensor: a ``Held`` has its data and scale put (under ``key`` with a suffix)."""
        if t is None:
            return None
        if not isinstance(t, Held):
            return self.put(key, t)
        scale = None if t.scale is None else self.put((key, "scale"), t.scale)
        return Held(self.put((key, "data"), t.data), scale, t.shape, t.packed)

    def reserve(self, key: object, like: torch.Tensor | Held, device: torch.device | None = None) -> None:
        """Allocate ``key``'s buffer for tensors like ``like`` now (outside compiled code), if it has none that fits:
        the differences of higher order appear at later full steps, which may run compiled. ``device``: where the
        buffer lives, for a ``like`` that only describes it (a meta tensor)."""
        if isinstance(like, Held):
            self._buffer((key, "data"), like.data)
            if like.scale is not None:
                self._buffer((key, "scale"), like.scale)
        else:
            self._buffer_for(key, like.shape, like.dtype, like.device if device is None else torch.device(device))

    def put_numbers(self, key: object, values: list | torch.Tensor, device: torch.device, dtype: torch.dtype
                    ) -> torch.Tensor:
        """``numbers_on`` written into ``key``'s buffer (on a GPU: from pinned memory, without a host wait)."""
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        buf = self._buffer_for(key, host.shape, dtype, torch.device(device))
        if buf is None:  # compiled code never prepares rows; kept for completeness
            return numbers_on(values, device, dtype)
        if device.type == "cuda":
            buf.copy_(host if host.is_pinned() else host.pin_memory(), non_blocking=True)
        else:
            buf.copy_(host)
        return buf

    def hold_history(self, key: object, hist: DiffHistory, value: torch.Tensor, gap_like: torch.Tensor) -> None:
        """Move ``hist``'s differences and gap into ``key``'s buffers, just after ``hist.update(value, ...)``. Outside
        compiled code, buffers for every order up to ``max_order`` and for the gap are reserved at once."""
        # the storage too: a budget may choose another one for the same shapes in a later generation (found by review)
        made_for = (value.shape, value.dtype, value.device, gap_like.dtype, hist.storage)
        reserve = not torch.compiler.is_compiling() and self._reserved.get(key) != made_for
        if reserve:
            if key in self._reserved:  # made for another value or storage: a stored difference is kept under other
                # keys (data and scale) than one held as computed, and the old ones would outlive it (found by review)
                # every order, the base (order 0) too: it is put at its first hold, not reserved here (found by
                # review: a budget's switch to int8 kept the float base beside the new one, over max_cache_bytes)
                kinds = [((key, j), ((key, j), "data"), ((key, j), "scale")) for j in range(hist.max_order + 1)]
                old = [k for keys in kinds for k in keys if k in self.buffers]
                for k in old:
                    del self.buffers[k]
                self.epoch += bool(old)
            st = hist.storage
            zero = torch.zeros_like(value)
            for j in range(1, hist.max_order + 1):
                self.reserve((key, j), zero if st is None else store(zero, st.diffs, st.scale))
            self.reserve((key, "gap"), gap_like.new_zeros(()))
            self._reserved[key] = made_for
        hist.hold_extra(self, key, gap_like, reserve)
        hist.diffs = [self.hold((key, j), d) for j, d in enumerate(hist.diffs)]
        if hist.gap is not None:
            hist.gap = self.put((key, "gap"), hist.gap)

    def snapshot(self) -> Callable[[], None]:
        """Save every buffer's contents; the returned function puts them back (a call that runs again from its
        start, ``FlopMeter.run_call``, must see the caches as they were)."""
        saved = {key: buf.clone() for key, buf in self.buffers.items()}

        def restore() -> None:
            for key in list(self.buffers):
                if key in saved and saved[key].shape == self.buffers[key].shape:
                    self.buffers[key].copy_(saved[key])
                else:  # allocated (or re-allocated) by the call: dropped, allocated again by the rerun
                    del self.buffers[key]
                    self.epoch += 1
            self._reserved.clear()

        return restore

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer held."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
