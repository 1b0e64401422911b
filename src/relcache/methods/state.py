"""A predictor's per-module memory (``PredictorState``): the output's divided differences, and RFE's stored input,
ratio, Gram and shared input-change norm. What the predictors compute from it is ``predictors.py``'s."""

from __future__ import annotations

import weakref

import torch

from .history import DiffHistory, Reducer, StaticCaches, sample_norm
from .storage import SHARED_INPUTS, CacheStorage, Held, held_bytes, load, owned, share_key, store


class PredictorState:
    """Per-module memory of a predictor: divided differences of the output, plus what the predictor adds."""

    __slots__ = ("out", "inp", "ratio", "gram", "step", "reducer", "owner", "led", "moved", "__weakref__")

    def __init__(self, order: int, dtype: torch.dtype | CacheStorage | None, reducer: Reducer | None = None) -> None:
        self.out = DiffHistory(order, dtype)
        self.inp: torch.Tensor | Held | None = None  # I(a) as stored (``storage.store``), Relational only
        self.ratio: torch.Tensor | None = None  # s per sample, Relational only
        self.gram: torch.Tensor | None = None  # <D_i, D_j> per sample, taken by compiled records (Relational)
        self.step: int | None = None  # the latest full step, kept by ``update`` (by-step-number use only)
        self.reducer = reducer  # the sequence is split over processes: norms are summed over them
        self.owner: PredictorState | None = None  # the state whose stored input ``inp`` is, where shared
        self.led = False  # another state shares this one's stored input: keep ``moved`` for it
        self.moved: tuple | None = None  # the latest input-change norm this state measured, for its followers

    @property
    def ready(self) -> bool:
        """True once a full step was recorded, i.e. a prediction is possible."""
        return self.out.ready

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: the output's differences, and the input, ratio and Gram where kept. An input
        shared with the state that stored it is that state's bytes (counted once)."""
        shared = self.owner is not None and self.owner.inp is self.inp
        return (self.out.nbytes + (0 if shared else held_bytes(self.inp)) + held_bytes(self.ratio)
                + held_bytes(self.gram))

    def hold_extra(self, static: StaticCaches, key: object, value: torch.Tensor, gap_like: torch.Tensor) -> None:
        """Move what a subclass keeps besides the output's history, input, ratio and Gram into ``static``'s buffers
        under ``key``, just after a record of ``value`` (``runtime.context.hold_state`` calls it first, before those
        are put). The paper's predictors keep nothing else."""
        return None

    def input(self, like: torch.dtype) -> torch.Tensor:
        """The stored input ``I(a)`` in dtype ``like``."""
        return load(self.inp, like)

    def store_input(self, inp: torch.Tensor) -> None:
        """Keep ``inp`` as ``I(a)``, in the input format of the state's storage; where another state stored this very
        tensor (same object, version and view) in this format, hold its copy (``storage.SharedInputs``).

        (choice) Compiled code cannot test tensor identity: there a state that shared its input in the eager calls
        (the first call of each input shape is eager) takes its owner's input again, which the owner stored earlier
        in the same call (a model's dataflow does not change between calls of one shape)."""
        st = self.out.storage
        fmt, axes, offload = (None, "token", False) if st is None else (st.input, st.scale, st.offload)
        if torch.compiler.is_compiling():
            if self.owner is not None:
                self.inp = self.owner.inp
            else:
                self.inp = inp if st is None else store(inp, fmt, axes, offload)
            return
        got = SHARED_INPUTS.find(inp, (fmt, offload), axes)
        if got is not None and got[1] is not self:
            self.inp, self.owner = got
            self.owner.led = True
            return
        self.inp, self.owner = (owned(inp) if st is None else store(inp, fmt, axes, offload)), None
        SHARED_INPUTS.add(inp, (fmt, offload), axes, self.inp, self)

    def input_moved(self, inp: torch.Tensor) -> torch.Tensor:
        """``‖inp - I(a)‖`` per sample: the one the state whose stored input this one shares measured where it applies
        (``shared_moved``), else measured here (and kept for followers)."""
        norm = self.shared_moved(inp)
        if norm is None:
            norm = sample_norm(inp - self.input(inp.dtype))
            self.keep_moved(inp, norm)
        return norm

    def shared_moved(self, inp: torch.Tensor) -> torch.Tensor | None:
        """``‖inp - I(a)‖`` per sample where the state whose stored input this one shares measured this very tensor
        (``storage.share_key``: same object, version and view) against that same stored input, else None: two passes
        over the input less, bit-identical (FLUX's single blocks run ``attn`` and ``proj_mlp`` on one modulated norm).

        (choice) Eager calls only: compiled code cannot test tensor identity (the compiler may merge the two
        computations itself)."""
        if torch.compiler.is_compiling() or self.owner is None or self.owner.moved is None:
            return None
        key = share_key(inp)
        got_key, base, stored, norm = self.owner.moved
        if key is None or got_key != key[0] or base() is not key[1] or stored() is not self.inp:
            return None
        return norm

    def keep_moved(self, inp: torch.Tensor, norm: torch.Tensor) -> None:
        """Keep ``norm`` (``‖inp - I(a)‖``, just measured) for the states that share this one's stored input; not one
        autograd recorded (it would hold its graph, and the input, past the step)."""
        if torch.compiler.is_compiling() or not self.led:
            return
        if self.inp is None or norm.requires_grad:
            self.moved = None
            return
        key = share_key(inp)
        self.moved = None if key is None else (key[0], weakref.ref(key[1]), weakref.ref(self.inp), norm)

    def prefetch(self) -> None:
        """Start copying what an offloaded state holds (``CacheStorage(offload=True)``) back to its device, ahead of
        the forecast that reads it; nothing for a state held on its device."""
        if torch.compiler.is_compiling():
            return
        for t in (*self.out.diffs, self.inp):
            if isinstance(t, Held):
                t.prefetch()
