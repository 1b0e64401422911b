"""RFE's eager forecast as two Triton kernels (``fused.py`` decides when they run; imported only then).

``_stats``: per sample and chunk, the input change's and the direction's squared sums, the direction ``u`` (Horner
form, rounded to the output dtype after each step as ``torch.addcmul`` rounds) written into the output buffer.
``_finish``: per sample, the two sums over its chunks, the coefficient ``s · ‖ΔI‖ / ‖u‖`` (``k`` where that is not
finite), rounded to the output dtype as the torch path rounds it, and ``out = base + coef · u`` in place. Every
program reads its sample's chunk sums itself, so the result does not depend on the order programs run in.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rounded(x, like):
    """``x`` (float32) rounded to ``like``'s dtype and widened back: what a torch op writing ``like`` keeps."""
    return x.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _load(ptr, p, mask, like):
    """A stored tensor's values at ``p``, as the torch path reads them: in ``like``'s dtype (``storage.load``)."""
    return _rounded(tl.load(ptr + p, mask=mask, other=0.0).to(tl.float32), like)


@triton.jit
def _stats(inp, inp_a, d1, d2, d3, d4, row, out, sums, n, chunk, n_chunks, ORDER: tl.constexpr,
           BLOCK: tl.constexpr):
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    moved = tl.zeros([BLOCK], tl.float32)
    size = tl.zeros([BLOCK], tl.float32)
    for start in range(0, chunk, BLOCK):
        offs = j * chunk + start + tl.arange(0, BLOCK)
        mask = (offs < n) & (start + tl.arange(0, BLOCK) < chunk)
        p = b * n + offs
        x = tl.load(inp + p, mask=mask, other=0.0).to(tl.float32)
        xa = _load(inp_a, p, mask, out)
        change = _rounded(x - xa, out)
        moved += change * change
        # u = D_1 + row[1] (D_2 + row[2] (D_3 + row[3] D_4)), rounded as each addcmul rounds
        if ORDER == 1:
            u = _load(d1, p, mask, out)
        else:
            if ORDER == 4:
                u = _load(d4, p, mask, out)
                u = _rounded(_load(d3, p, mask, out) + tl.load(row + 3) * u, out)
                u = _rounded(_load(d2, p, mask, out) + tl.load(row + 2) * u, out)
            elif ORDER == 3:
                u = _load(d3, p, mask, out)
                u = _rounded(_load(d2, p, mask, out) + tl.load(row + 2) * u, out)
            else:
                u = _load(d2, p, mask, out)
            u = _rounded(_load(d1, p, mask, out) + tl.load(row + 1) * u, out)
        u = _rounded(u, out)
        size += u * u
        tl.store(out + p, u.to(out.dtype.element_ty), mask=mask)
    tl.store(sums + (b * n_chunks + j) * 2, tl.sum(moved, axis=0))
    tl.store(sums + (b * n_chunks + j) * 2 + 1, tl.sum(size, axis=0))


@triton.jit
def _finish(base, out, sums, ratio, k, n, chunk, n_chunks, BLOCK: tl.constexpr, SUMS_BLOCK: tl.constexpr):
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    moved = tl.zeros([SUMS_BLOCK], tl.float32)
    size = tl.zeros([SUMS_BLOCK], tl.float32)
    for start in range(0, n_chunks, SUMS_BLOCK):
        q = start + tl.arange(0, SUMS_BLOCK)
        got = q < n_chunks
        moved += tl.load(sums + (b * n_chunks + q) * 2, mask=got, other=0.0)
        size += tl.load(sums + (b * n_chunks + q) * 2 + 1, mask=got, other=0.0)
    # IEEE square roots and division, as torch takes them (``tl.sqrt`` may be an approximation)
    coef = tl.load(ratio + b).to(tl.float32) * tl.sqrt_rn(tl.sum(moved, axis=0))
    coef = tl.div_rn(coef, tl.sqrt_rn(tl.sum(size, axis=0)))
    coef = tl.where(tl.abs(coef) < float("inf"), coef, k)  # not finite (0/0, x/0, inf, nan): Taylor's k
    coef = _rounded(coef, out)
    for start in range(0, chunk, BLOCK):
        offs = j * chunk + start + tl.arange(0, BLOCK)
        mask = (offs < n) & (start + tl.arange(0, BLOCK) < chunk)
        p = b * n + offs
        u = tl.load(out + p, mask=mask, other=0.0).to(tl.float32)
        x0 = _load(base, p, mask, out)
        tl.store(out + p, (x0 + coef * u).to(out.dtype.element_ty), mask=mask)
