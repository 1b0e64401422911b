"""RFE's eager forecast as two Triton kernels (``fused.py`` decides when they run; imported only then).

``_stats``: per sample and chunk (chunk ``j`` of the input and chunk ``j`` of the output, each of its own size), the
input change's and the direction's squared sums, the direction ``u`` (Horner form, rounded to the output dtype after
each step as ``torch.addcmul`` rounds) written into the output buffer (at order 1 ``u`` is ``D_1`` itself and is read
from there instead). ``_finish``: per sample, the two sums over its chunks, the coefficient ``s · ‖ΔI‖ / ‖u‖``
(``k`` where that or ``‖u‖`` is not finite), clamped to float16's range and rounded to the output dtype as the
torch path clamps and rounds it, and ``out = base + coef · u``. Every program reads its sample's chunk sums itself,
so the result does not depend on the order programs run in. Launched with ``enable_fp_fusion=False``: torch rounds
each product before the sum, and so do these.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rounded(x, like):
    """``x`` (float32) rounded to ``like``'s dtype and widened back: what a torch op writing ``like`` keeps."""
    return x.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _load(ptr, offs, mask, like):
    """A stored tensor's values, as the torch path reads them: in ``like``'s dtype (``storage.load``)."""
    return _rounded(tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), like)


@triton.jit
def _direction(d1, d2, d3, d4, c1, c2, c3, offs, mask, like, ORDER: tl.constexpr):
    """``u = D_1 + c_1 (D_2 + c_2 (D_3 + c_3 D_4))`` to order ``ORDER``, rounded as each ``addcmul`` rounds."""
    if ORDER == 1:
        u = _load(d1, offs, mask, like)
    else:
        if ORDER == 4:
            u = _load(d4, offs, mask, like)
            u = _rounded(_load(d3, offs, mask, like) + c3 * u, like)
            u = _rounded(_load(d2, offs, mask, like) + c2 * u, like)
        elif ORDER == 3:
            u = _load(d3, offs, mask, like)
            u = _rounded(_load(d2, offs, mask, like) + c2 * u, like)
        else:
            u = _load(d2, offs, mask, like)
        u = _rounded(_load(d1, offs, mask, like) + c1 * u, like)
    return u


@triton.jit
def _stats(inp, inp_a, d1, d2, d3, d4, row, out, sums, n_in, chunk_in, n, chunk, n_chunks, ORDER: tl.constexpr,
           BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    # the input's chunk j (its own size: a module's input and output may differ, FLUX's proj_mlp 3072 -> 12288)
    start = b * n_in + j * chunk_in  # 64-bit bases; offsets within a chunk stay 32-bit
    left = n_in - j * chunk_in
    inp, inp_a = inp + start, inp_a + start
    moved = tl.zeros([BLOCK], tl.float32)
    for first in range(0, chunk_in, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < left
        x = tl.load(inp + offs, mask=mask, other=0.0).to(tl.float32)
        change = _rounded(x - _load(inp_a, offs, mask, out), out)
        moved += change * change
    # the output's chunk j
    start = b * n + j * chunk
    left = n - j * chunk
    d1, d2, d3, d4, out = d1 + start, d2 + start, d3 + start, d4 + start, out + start
    # the Horner multipliers k/2, k/3, k/4, rounded to the model's dtype as addcmul rounds its 0-d operand
    c1 = _rounded(tl.load(row + 1).to(tl.float32), out)
    c2 = _rounded(tl.load(row + 2).to(tl.float32), out)
    c3 = _rounded(tl.load(row + 3).to(tl.float32), out)
    size = tl.zeros([BLOCK], tl.float32)
    for first in range(0, chunk, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < left
        u = _direction(d1, d2, d3, d4, c1, c2, c3, offs, mask, out, ORDER)
        size += u * u
        if ORDER > 1:
            tl.store(out + offs, u.to(out.dtype.element_ty), mask=mask)
    tl.store(sums + (b * n_chunks + j) * 2, tl.sum(moved, axis=0))
    tl.store(sums + (b * n_chunks + j) * 2 + 1, tl.sum(size, axis=0))


@triton.jit
def _finish(base, u_ptr, out, sums, ratio, k, n, chunk, n_chunks, BLOCK: tl.constexpr, SUMS_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    moved = tl.zeros([SUMS_BLOCK], tl.float32)
    size = tl.zeros([SUMS_BLOCK], tl.float32)
    for first in range(0, n_chunks, SUMS_BLOCK):
        q = first + tl.arange(0, SUMS_BLOCK)
        got = q < n_chunks
        moved += tl.load(sums + (b * n_chunks + q) * 2, mask=got, other=0.0)
        size += tl.load(sums + (b * n_chunks + q) * 2 + 1, mask=got, other=0.0)
    # IEEE square roots and division, as torch takes them (``tl.sqrt`` may be an approximation)
    size = tl.sqrt_rn(tl.sum(size, axis=0))
    coef = tl.div_rn(tl.load(ratio + b).to(tl.float32) * tl.sqrt_rn(tl.sum(moved, axis=0)), size)
    # not finite (0/0, x/0, inf, nan), or ‖u‖ infinite (a recorded float16 overflow; c was 0): Taylor's k
    coef = tl.where((tl.abs(coef) < float("inf")) & (size < float("inf")), coef, k)
    if out.dtype.element_ty == tl.float16:  # clamped into float16's range first, as ``history.narrowed``: an inf
        coef = tl.minimum(coef, 65504.0)  # coefficient made inf · 0 NaN where u is zero (it is never negative)
    coef = _rounded(coef, out)
    start = b * n + j * chunk
    left = n - j * chunk
    base, u_ptr, out = base + start, u_ptr + start, out + start
    for first in range(0, chunk, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < left
        u = _load(u_ptr, offs, mask, out)
        x0 = _load(base, offs, mask, out)
        tl.store(out + offs, (x0 + coef * u).to(out.dtype.element_ty), mask=mask)
