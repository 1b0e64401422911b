"""The input-fitted increment (ours, issue 19): a predictor that takes a module's whole output move from its input's
move, fitted per sample in the span of the moves recorded at recent full steps (docs/spec.md, "Input-fitted
increment"). ``relcache.RFCPlus(fit=True)`` pairs it with RCS or with calibrated full steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, check_int
from .history import MAX_ORDER, Reducer, StaticCaches, finite, narrowed, per_sample, row_dtype, sample_norm
from .predictors import Predictor
from .state import PredictorState
from .storage import CacheStorage, held_bytes


class FitState(PredictorState):
    """``PredictorState`` (the output ``O(a)``; its divided differences too for ``blend``'s RFE part) plus the moves of
    the input and the output between the latest full steps: stacked per sample, with what the fit needs of them
    taken at the full step, so that a cached step reads each move once (``InputFit``)."""

    __slots__ = ("in_diffs", "out_diffs", "basis_in", "basis_out", "solve", "gram_out", "gram_in", "gram_full_out",
                 "max_moves")

    def __init__(self, order: int, history_order: int, reducer: Reducer | None = None) -> None:
        super().__init__(history_order, None, reducer)
        self.max_moves = order  # the moves kept at most
        self.in_diffs: list[torch.Tensor] = []  # I(a) - I(b), I(b) - I(c), ... newest first (``blend`` only)
        self.out_diffs: list[torch.Tensor] = []  # the same of the output (``blend`` only)
        self.basis_in: torch.Tensor | None = None  # (n, j, input size): ΔI_1 .. ΔI_j, newest first
        self.basis_out: torch.Tensor | None = None  # (n, j, output size): ΔO_1 .. ΔO_j
        self.solve: torch.Tensor | None = None  # (n, j, j): (G_in + ridge · mean diag(G_in) · 1)^-1
        self.gram_out: torch.Tensor | None = None  # (n, j, j): G_out / s², G_out = <ΔO_i, ΔO_j> (``scale`` only)
        self.gram_in: torch.Tensor | None = None  # (n, j, j), float64: G_in, kept for the next record's update
        self.gram_full_out: torch.Tensor | None = None  # (n, j, j), float64: G_out, the same

    def _fit_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.basis_in, self.basis_out, self.solve, self.gram_out, self.gram_in, self.gram_full_out

    @property
    def nbytes(self) -> int:
        """``PredictorState.nbytes`` plus the stacked moves and the two small matrices per sample."""
        extra = sum(held_bytes(t) for t in (*self._fit_tensors(), *self.in_diffs, *self.out_diffs))
        return super().nbytes + extra

    def hold_extra(self, static: StaticCaches, key: object, value: torch.Tensor, gap_like: torch.Tensor) -> None:
        """The stacked moves and matrices into their own buffers, one per count of moves ``j`` (reserved for every
        ``j`` outside compiled code, from the recorded input's and output's shapes)."""
        names = ("basis_in", "basis_out", "solve", "gram_out", "gram_in", "gram_full_out")
        made_for = (None if not isinstance(self.inp, torch.Tensor) else
                    (self.inp.shape, self.inp.dtype, value.shape, value.dtype, value.device, self.max_moves))
        fit_key = (key, "fit")
        if (not torch.compiler.is_compiling() and made_for is not None
                and static._reserved.get(fit_key) != made_for):  # once per shape, as ``hold_history``
            static._reserved[fit_key] = made_for
            n, size_in, size_out = value.shape[0], self.inp[0].numel(), value[0].numel()
            for j in range(1, self.max_moves + 1):
                rows = row_dtype(value.dtype)
                wide = value.new_zeros(n, j, j, dtype=torch.float64)
                likes = (self.inp.new_zeros(n, j, size_in), value.new_zeros(n, j, size_out),
                         value.new_zeros(n, j, j, dtype=rows), value.new_zeros(n, j, j, dtype=rows), wide, wide)
                for name, like in zip(names, likes, strict=True):
                    static.reserve((key, "fit", name, j), like)
        for name, t in zip(names, self._fit_tensors(), strict=True):
            if t is not None:
                setattr(self, name, static.put((key, "fit", name, t.shape[1]), t))


@dataclass(frozen=True)
class InputFit(Predictor):
    """The output moves as the input does, per sample, in the span of recent moves (ours, issue 19).

    At a full step ``a`` the state keeps the last ``order`` input moves ``ΔI_j`` and output moves ``ΔO_j`` between
    consecutive full steps. At a cached step the input's move ``v = I(i) - I(a)`` is fitted by least squares,
    ``v ≈ Σ c_j ΔI_j`` (a ``order x order`` system per sample, ridge ``ridge`` times its mean diagonal), and the
    forecast is ``O(a) + Σ c_j ΔO_j``: the module taken as locally linear, its Jacobian sampled by the recorded moves.
    ``scale=True`` then rescales the increment to RFE's magnitude ``s · ‖v‖``; ``blend=True`` instead mixes it with
    RFE's forecast increment by the fit's R² (the share of ``‖v‖²`` the fit explains; an experiment, measured in
    ``benchmarks/plus.py``).

    The full step takes the Grams of the moves (in float64) and the inverse of the regularised input Gram, so a
    cached step reads each stored move once: ``v``, its dot products with the input moves (one batched product),
    ``‖v‖``, and the forecast in one batched multiply-add; ``‖Σ c_j ΔO_j‖`` comes from the output Gram, divided by
    ``s²`` at the full step (docs/spec.md, "Input-fitted increment"). (choice) No context parallelism and no narrow
    cache storage: the moves are kept as computed."""

    order: int = 2
    ridge: float = 1e-3
    scale: bool = False
    blend: bool = False
    uses_input: ClassVar[bool] = True
    computed_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("order", self.order, 1, MAX_ORDER)
        if not (isinstance(self.ridge, (int, float)) and not isinstance(self.ridge, bool) and self.ridge >= 0):
            raise ConfigError(f"ridge must be a number >= 0, got {self.ridge!r}")
        for name in ("scale", "blend"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.scale and self.blend:
            raise ConfigError("give scale=True or blend=True, not both")

    def new_state(self, dtype: torch.dtype | CacheStorage | None = None, reducer: Reducer | None = None,
                  ) -> PredictorState:
        if reducer is not None:
            raise ConfigError("InputFit does not run on a sequence split over processes (context parallelism): use "
                              "RFC or RFCPlus's default predictor there")
        if dtype is not None and (not isinstance(dtype, CacheStorage) or dtype != CacheStorage()):
            raise ConfigError(f"InputFit keeps its caches as computed: give no cache storage, got {dtype!r}")
        return FitState(self.order, self.order if self.blend else 0, reducer)

    def state_bytes(self, out_shape: tuple[int, ...], in_shape: tuple[int, ...], computed: torch.dtype,
                    storage: CacheStorage | None, input_shared: bool = False) -> int:
        """``O(a)``, ``I(a)``, ``order`` moves of each and the two ``order x order`` float64 matrices per sample."""
        n = out_shape[0] if out_shape else 1
        size = torch.empty((), dtype=computed).element_size()
        numel_out, numel_in = _numel(out_shape), _numel(in_shape)
        rows = 8 if computed == torch.float64 else 4
        matrices = 2 if self.scale else 1  # the inverse and G_out / s², in the rows' dtype; the two Grams in float64
        total = size * (numel_out * (1 + self.order) + numel_in * self.order) + rows * matrices * n * self.order ** 2
        total += 8 * 2 * n * self.order ** 2
        total += rows * n  # the ratio
        if self.blend:
            total += size * numel_out * self.order  # the output's divided differences (RFE's direction)
            total += size * (numel_out + numel_in) * self.order  # the moves as lists
        return total + (0 if input_shared else size * numel_in)

    def record(self, state: PredictorState, inp: torch.Tensor, out: torch.Tensor, gap: torch.Tensor | None) -> None:
        assert isinstance(state, FitState)
        prev_in, prev_out = state.inp, (state.out.base(out.dtype) if state.out.ready else None)
        if prev_in is not None and prev_out is not None and prev_in.shape == inp.shape and prev_out.shape == out.shape:
            n = inp.shape[0]
            old = state.basis_in if state.basis_in is not None and state.basis_in.shape[0] == n else None
            keep = 0 if old is None else min(self.order - 1, old.shape[1])
            state.basis_in, g_in = _stack_move(inp, prev_in, state.basis_in, state.gram_in, keep)
            state.basis_out, g_out = _stack_move(out, prev_out, state.basis_out, state.gram_full_out, keep)
            state.gram_in, state.gram_full_out = g_in, g_out
            eye = torch.eye(g_in.shape[-1], dtype=g_in.dtype, device=g_in.device)
            reg = self.ridge * g_in.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
            # (choice) held in the rows' precision (float32 but for float64 models): a cached step's small products
            # then need no casts; a non-finite inverse (moves of zero length, ridge 0) becomes zeros here, once
            rows = row_dtype(out.dtype)
            # (narrowed first: an inverse finite in float64 may overflow float32, found by review)
            state.solve = torch.nan_to_num(torch.linalg.inv_ex(g_in + reg)[0].to(rows), nan=0.0, posinf=0.0,
                                           neginf=0.0)
            ratio2 = g_out[:, 0, 0] / g_in[:, 0, 0]  # s², in float64
            state.ratio = ratio2.sqrt().to(rows)
            # ``scale``: G_out / s², so that a cached step's ‖Σ c_j ΔO_j‖ / s is one root (s infinite or NaN gives
            # the factor 1, as dividing by s would)
            if self.scale:  # s = 0: the factor s · ‖v‖ / ‖...‖ is 0, so the forecast is O(a): the sample's inverse is
                # zeroed (its coefficients are 0 at every cached step). (An infinite G_out / s² made cᵀ G c NaN for
                # coefficients of mixed sign, and the NaN factor fell back to 1: found by review.)
                still = ratio2[:, None, None] == 0
                state.solve = torch.where(still, 0.0, state.solve)
                state.gram_out = torch.where(still, 0.0, g_out / ratio2[:, None, None]).to(rows)
            else:
                state.gram_out = None
            if self.blend:
                d_in, d_out = state.basis_in, state.basis_out
                state.in_diffs = [d_in[:, j].reshape(inp.shape) for j in range(d_in.shape[1])]
                state.out_diffs = [d_out[:, j].reshape(out.shape) for j in range(d_out.shape[1])]
        else:
            state.in_diffs, state.out_diffs, state.ratio = [], [], None
            state.basis_in = state.basis_out = state.solve = state.gram_out = None
            state.gram_in = state.gram_full_out = None
        state.out.update(out, gap)
        state.inp = inp

    def forecast(self, state: PredictorState, inp: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        assert isinstance(state, FitState)
        base = state.out.base(inp.dtype)
        if state.basis_in is None:
            return base
        if self.blend:
            return self._blend(state, inp, row, base)
        n = inp.shape[0]
        move = inp - state.inp
        if torch.compiler.is_compiling():
            return self._compiled(state, move, base)
        if move.dtype == torch.float16:  # products too in float32: a float16 product of moves past 256 overflows
            # (found by review); the product of two float16 numbers is exact in float32
            dots = (state.basis_in * move.reshape(n, 1, -1).float()).sum(-1)[:, None]
        elif move.element_size() < 4:  # bfloat16: products summed in float32 (bfloat16 rounds the sum)
            dots = (state.basis_in * move.reshape(n, 1, -1)).sum(-1, dtype=torch.float32)[:, None]
        else:  # rows, not columns: (1, N) x (N, j) runs as one fast matrix-vector product on a CPU, (j, N) x (N, 1)
            # does not
            dots = torch.bmm(move.reshape(n, 1, -1), state.basis_in.transpose(1, 2))  # <v, ΔI_j>, (n, 1, j)
        coef = torch.bmm(dots.to(state.solve.dtype), state.solve)  # cᵀ (the inverse is symmetric)
        if self.scale and state.gram_out is not None:
            # ‖Σ c_j ΔO_j‖² / s² = cᵀ (G_out / s²) c; the increment's length is set to s · ‖v‖ (factor 1 where that
            # is not finite)
            length = torch.bmm(torch.bmm(coef, state.gram_out), coef.transpose(1, 2))[:, 0, 0].sqrt()
            fac = torch.nan_to_num(sample_norm(move) / length, nan=1.0, posinf=1.0, neginf=1.0)
            coef = coef * fac[:, None, None]
        weights = narrowed(coef, base.dtype)
        moves_out = state.basis_out.to(base.dtype)  # (a module may return another dtype than it takes)
        if (move.shape == base.shape and move.dtype == base.dtype and move.is_contiguous()
                and not torch.is_grad_enabled()):
            # written over the input's move, read by now: a fresh large buffer page-faults on a CPU (as in RFE)
            return torch.baddbmm(base.reshape(n, 1, -1), weights, moves_out, out=move.view(n, 1, -1)).view(
                base.shape)
        return torch.baddbmm(base.reshape(n, 1, -1), weights, moves_out).reshape(base.shape)  # O(a) + Σ c_j ΔO_j

    def _compiled(self, state: FitState, move: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``forecast``'s numbers as sums of products instead of batched matrix products: inductor fuses these with
        the input's move, its norm and the final add (a batched product is an external kernel of its own)."""
        n = move.shape[0]
        if move.dtype == torch.float16:  # products in float32 too (as eager): a float16 product overflows
            dots = (state.basis_in.float() * move.reshape(n, 1, -1).float()).sum(-1)  # (n, j)
        else:
            wide = torch.float32 if move.element_size() < 4 else None
            dots = (state.basis_in * move.reshape(n, 1, -1)).sum(-1, dtype=wide)  # (n, j)
        coef = (dots.to(state.solve.dtype)[:, :, None] * state.solve).sum(1)  # cᵀ A, A symmetric
        if self.scale and state.gram_out is not None:
            length = ((coef[:, :, None] * state.gram_out).sum(1) * coef).sum(-1).sqrt()
            fac = torch.nan_to_num(sample_norm(move) / length, nan=1.0, posinf=1.0, neginf=1.0)
            coef = coef * fac[:, None]
        inc = (narrowed(coef, base.dtype)[:, :, None] * state.basis_out.to(base.dtype)).sum(1)  # Σ c_j ΔO_j, (n, size)
        return base + inc.reshape(base.shape)

    def _blend(self, state: FitState, inp: torch.Tensor, row: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The experiment's mix of the fitted and RFE's increments by the fit's R² (computed in full, not lean)."""
        n, m = inp.shape[0], len(state.in_diffs)
        move = inp - state.inp
        v = move.reshape(n, -1, 1).double()
        basis = torch.stack([d.reshape(n, -1) for d in state.in_diffs], 1).double()  # (n, m, N)
        gram = basis @ basis.transpose(1, 2)
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        reg = self.ridge * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
        # a singular system (a sample whose recorded moves are all zero: ridge scales with the Gram's diagonal) gives
        # non-finite coefficients, zeroed as the lean path zeroes its inverse; ``solve`` raised there (found by review)
        coef = torch.linalg.solve_ex(gram + reg, basis @ v)[0][..., 0]  # (n, m)
        coef = narrowed(torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef)), base.dtype)
        inc = sum(per_sample(coef[:, j], d) * d for j, d in enumerate(state.out_diffs))
        u = state.out.direction(row, base.dtype) if len(state.out_diffs) >= 2 else None
        if u is not None and state.ratio is not None:
            # R² of the fit: the share of the input's move the recorded moves explain; the rest goes to RFE
            fitted = (basis.transpose(1, 2) @ coef.double()[..., None])[..., 0]
            r2 = (fitted.square().sum(1) / v[..., 0].square().sum(1)).clamp(0, 1).to(base.dtype)
            r2 = torch.where(finite(r2), r2, torch.zeros_like(r2))
            rfe = per_sample(state.ratio * sample_norm(move) / sample_norm(u), u) * u  # RFE's increment
            rfe = torch.where(finite(rfe), rfe, torch.zeros_like(rfe))
            inc = per_sample(r2, inc) * inc + per_sample(1 - r2, rfe) * rfe
        return base + inc


def _stack_move(now: torch.Tensor, prev: torch.Tensor, old: torch.Tensor | None, old_gram: torch.Tensor | None,
                keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[now - prev, old's first keep moves]`` stacked per sample as ``(n, 1 + keep, size)``, in a fresh tensor (a
    record never writes into what it holds: ``StepCalls._snapshot``), and its Gram in float64: the new move's products
    with every kept move, one row-vector product, beside the old Gram's block for the kept ones."""
    n = now.shape[0]
    basis = now.new_empty(n, 1 + keep, now[0].numel())
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and (now.requires_grad or prev.requires_grad):
        # dynamo does not trace a strided out= (a graph break; inductor fuses this), and autograd refuses out=
        basis[:, 0] = now.reshape(n, -1) - prev.reshape(n, -1)
    else:
        torch.sub(now.reshape(n, -1), prev.reshape(n, -1), out=basis[:, 0])
    if keep:
        basis[:, 1:].copy_(old[:, :keep])
    wide = basis if basis.element_size() >= 4 else basis.float()  # 16-bit: a float16 sum overflows, bfloat16 rounds
    dots = torch.bmm(wide[:, :1], wide.transpose(1, 2))[:, 0].double()  # <ΔX_1, ΔX_k>, (n, 1 + keep)
    gram = dots.new_empty(n, 1 + keep, 1 + keep)
    gram[:, 0], gram[:, :, 0] = dots, dots
    if keep:
        gram[:, 1:, 1:] = old_gram[:, :keep, :keep]
    return basis, gram


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
