"""RFE's eager forecast in two kernels instead of eight or nine: opt-in, for launch-bound GPUs.

An eager RFE forecast of order 2 launches 8 kernels per cached module in float32 (the input change, its norm, the
direction, its norm, a product and a quotient for the coefficient, the fallback, the forecast), 9 in float16 and
bfloat16 (the coefficient's cast), more than many of the modules it replaces; on a
launch-bound GPU that makes an eager RFC cached step cost about what a full step does (docs/performance.md). Here the
same forecast is two Triton kernels (``fused_kernels.py``): one pass that forms the direction and both squared sums
per chunk, one that finishes the coefficient and writes ``base + coef · u``. The numbers are the torch path's up to
the order of summation in the two norms (every intermediate is rounded to the model's dtype where torch rounds it).

(choice) Off by default: its speed is not measured on a GPU yet (``benchmarks/cached_step.py --fused`` does it).
Turn it on with ``RELCACHE_FUSED_FORECAST=1`` in the environment (read at each forecast) or
``relcache.methods.fused.set_enabled(True)``. It runs only where it applies: eager code (neither compiled nor recording
autograd), a CUDA device (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``: tests; on another device relcache says
so once), float16, bfloat16 or float32, order 1 to 4, every operand a plain
tensor (no narrow or offloaded storage; strided ones are copied first), the plain divided differences (not RFC+'s
Newton form) and a state recorded eagerly (a compiled record keeps a Gram instead). A module's output may differ in
shape from its input (FLUX's single blocks cache ``proj_mlp``, 3072 -> 12288 features).
Anything else takes the torch path. If the kernels fail to build or launch (Triton missing included), relcache warns
once and keeps to the torch path until ``set_enabled(True)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence

import torch

from ..errors import warn

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 1024  # elements per vector step of a program
MIN_CHUNK = 4 * BLOCK  # elements per program at least
# programs per sample at most: each ``_finish`` program reads all its sample's chunk sums (8 KiB at most)
MAX_CHUNKS = 1024
SUMS_BLOCK_MAX = 1024  # _finish's block over a sample's chunk sums: a power of two (more chunks loop)
PROGRAMS_PER_SM = 4  # chunks are sized for about this many programs per multiprocessor over the batch
INTERPRETED_SMS = 132  # the multiprocessors assumed under Triton's CPU interpreter (an H100's or H200's count)

ENV = "RELCACHE_FUSED_FORECAST"
_enabled: bool | None = None  # set_enabled's word; None: the environment's (read at each call)
_broken = False  # the kernels failed once: the torch path from then on
_told_device = False  # said once that the switch is on where no CUDA device runs the model
#: Triton kernels launched so far in this process (2 per fused forecast): benchmarks add them to the ATen kernels
#: they count, which leave these out
launches = 0


def set_enabled(on: bool | None) -> None:
    """Use the fused forecast where it applies (``True``), never (``False``), or as ``RELCACHE_FUSED_FORECAST`` says
    (``None``, the default). Turning it on also forgets an earlier failure of the kernels."""
    global _enabled, _broken
    _enabled = None if on is None else bool(on)
    if on:
        _broken = False


def enabled() -> bool:
    """Whether the fused forecast is on: ``set_enabled``'s word, else ``RELCACHE_FUSED_FORECAST`` (1, true, yes or
    on), and the kernels have not failed."""
    on = _enabled if _enabled is not None else os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return on and not _broken


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def applies(inp: torch.Tensor, inp_a: object, diffs: Sequence[object]) -> bool:
    """Whether the fused kernels can forecast for input ``inp`` from the stored input ``inp_a`` and output differences
    ``diffs``: all plain tensors on ``inp``'s device in a dtype the kernels read, ``inp_a`` of ``inp``'s shape, the
    differences of one shape with ``inp``'s batch (a module's output may differ from its input). Strided ones are
    copied to contiguous memory first (``forecast``: one kernel each; ACE-Step's cached modules take a transposed
    input)."""
    if not enabled() or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not (inp.is_cuda or _interpreting()):
        _tell_device(inp.device)
        return False
    if type(inp) is not torch.Tensor or inp.dtype not in _DTYPES or inp.dim() == 0 or inp.numel() == 0:
        return False
    for t in (inp_a, *diffs):  # (subclasses, such as fake tensors, have no data a kernel could read)
        if type(t) is not torch.Tensor or t.device != inp.device or t.dtype not in _DTYPES:
            return False
    shape = diffs[0].shape
    return (inp_a.shape == inp.shape and all(d.shape == shape for d in diffs) and len(shape) > 0
            and shape[0] == inp.shape[0] and diffs[0].numel() > 0)


def _tell_device(device: torch.device) -> None:
    """Say once that the fused forecast is on but the model runs where it cannot (no CUDA device)."""
    global _told_device
    if not _told_device:
        _told_device = True
        warn(f"relcache: the fused RFE forecast is on ({ENV} or set_enabled) but the model runs on {device}; it needs "
             "a CUDA device, so the torch path runs", RuntimeWarning)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _chunks(n: int, batch: int, device: torch.device) -> tuple[int, int]:
    """(elements per program, programs per sample): about ``PROGRAMS_PER_SM`` programs per multiprocessor over the
    batch, each at least ``MIN_CHUNK`` elements, whole blocks, at most ``MAX_CHUNKS`` per sample."""
    want = _ceil(PROGRAMS_PER_SM * _multiprocessors(device), batch)
    chunk = max(MIN_CHUNK, _ceil(n, max(1, min(want, MAX_CHUNKS))), _ceil(n, MAX_CHUNKS))
    chunk = _ceil(chunk, BLOCK) * BLOCK
    return chunk, _ceil(n, chunk)


def forecast(inp: torch.Tensor, inp_a: torch.Tensor, diffs: Sequence[torch.Tensor], row: torch.Tensor,
             ratio: torch.Tensor, k: float) -> torch.Tensor | None:
    """RFE's forecast ``D_0 + c · u`` with ``u`` the Taylor direction of ``diffs`` (``D_0 .. D_m``, ``m >= 1``) at
    ``row`` and ``c = ratio · ‖inp - inp_a‖ / ‖u‖`` per sample (``k`` where not finite), in ``inp``'s dtype; None
    where the kernels failed (the caller takes the torch path). ``applies`` must have said yes."""
    global _broken, launches
    inp, inp_a = inp.contiguous(), inp_a.contiguous()  # the kernels read flat memory (no copy where it already is)
    diffs = [d.contiguous() for d in diffs]
    order = len(diffs) - 1
    batch = inp.shape[0]
    n_in, n = inp.numel() // batch, diffs[0].numel() // batch
    chunk, n_chunks = _chunks(n, batch, inp.device)  # chunk j of the output and chunk j of the input per program
    chunk_in = _ceil(_ceil(n_in, n_chunks), BLOCK) * BLOCK  # the input's chunk j: as many chunks, whole blocks
    out = torch.empty(diffs[0].shape, dtype=inp.dtype, device=inp.device)
    sums = torch.empty(batch, n_chunks, 2, dtype=torch.float32, device=inp.device)
    ds = [diffs[min(j, order)] for j in range(1, 5)]  # unused orders: any valid pointer
    grid = (batch, n_chunks)
    sums_block = min(max(16, 1 << (n_chunks - 1).bit_length()), SUMS_BLOCK_MAX)
    # Triton launches on the current device's current stream: make that ``inp``'s (a model split over devices)
    place = torch.cuda.device(inp.device) if inp.is_cuda else contextlib.nullcontext()
    try:
        from . import fused_kernels as kern
        with place:
            kern._stats[grid](inp, inp_a, *ds, row, out, sums, n_in, chunk_in, n, chunk, n_chunks, ORDER=order,
                              BLOCK=BLOCK, enable_fp_fusion=False)
            kern._finish[grid](diffs[0], out if order > 1 else diffs[1], out, sums, ratio, float(k), n, chunk,
                               n_chunks, BLOCK=BLOCK, SUMS_BLOCK=sums_block, enable_fp_fusion=False)
    except Exception as err:  # noqa: BLE001 - any failure to build or launch: the torch path, said once
        _broken = True
        warn(f"relcache: the fused RFE forecast failed ({type(err).__name__}: {err}); using the torch path from now "
             "on", RuntimeWarning)
        return None
    launches += 2
    return out
