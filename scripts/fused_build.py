"""Build relcache's fused RFE kernels (``methods/fused_kernels.py``) for a CUDA target with the installed Triton, on a
machine without a GPU: whether they compile to a cubin, for every dtype and order the forecast launches them with.

A GPU session is short, and the device's torch pins its own Triton (torch 2.11 pins 3.6, while the tests here run
3.9): run this under that Triton first, so that a kernel that does not build is found before the session. It also
checks that ``_finish`` takes IEEE square roots and divisions (``sqrt.rn.f32``, ``div.rn.f32``) as torch does.

    python scripts/fused_build.py --arch 90     # H100 / H200
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (90: sm_90)")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the CPU interpreter
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="relcache-fused-build-"))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    from relcache.methods import fused_kernels as kern
    from relcache.methods.fused import BLOCK, SUMS_BLOCK_MAX

    target = GPUTarget("cuda", args.arch, 32)
    options = {"enable_fp_fusion": False}  # as ``fused.forecast`` launches them
    built = 0
    for dt in ("fp16", "bf16", "fp32"):
        for order in (1, 2, 3, 4):
            sig = {name: f"*{dt}" for name in ("inp", "inp_a", "d1", "d2", "d3", "d4")}
            sig.update(row="*fp32", out=f"*{dt}", sums="*fp32", n_in="i32", chunk_in="i32", n="i32", chunk="i32",
                       n_chunks="i32", ORDER="constexpr", BLOCK="constexpr")
            triton.compile(ASTSource(kern._stats, sig, {"ORDER": order, "BLOCK": BLOCK}), target=target,
                           options=options)
            built += 1
        sig = dict(base=f"*{dt}", u_ptr=f"*{dt}", out=f"*{dt}", sums="*fp32", ratio="*fp32", k="fp32", n="i32",
                   chunk="i32", n_chunks="i32", BLOCK="constexpr", SUMS_BLOCK="constexpr")
        for sums_block in (16, SUMS_BLOCK_MAX):  # the smallest and largest ``fused.forecast`` uses
            ptx = triton.compile(ASTSource(kern._finish, sig, {"BLOCK": BLOCK, "SUMS_BLOCK": sums_block}),
                                 target=target, options=options).asm["ptx"]
            if "sqrt.rn.f32" not in ptx or "div.rn.f32" not in ptx:
                raise SystemExit(f"_finish ({dt}) does not take IEEE square roots and divisions on sm_{args.arch}")
            built += 1
    print(f"triton {triton.__version__}: built {built} kernels for sm_{args.arch}")


if __name__ == "__main__":
    main()
