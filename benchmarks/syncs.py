"""Host-device synchronisations per generation, by method and by source line (CUDA only): a benchmark.

A cached step should never make the host wait for the GPU inside the model: a sync stops the host from
queueing the next kernels while the GPU drains. This runs one 50-step generation of speed.py's DiT
(random weights) per method under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every
synchronising call, and counts the warnings by the file and line that raised them.

    python benchmarks/syncs.py --models XL --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import warnings
from pathlib import Path

import torch
from speed import SIZES, build, generate, methods

import relcache


def count_syncs(model: torch.nn.Module, config: relcache.CacheConfig | None, steps: int, dtype: torch.dtype,
                ) -> collections.Counter[str]:
    """Sync warnings of one generation with ``config`` (None: full computation), keyed by ``file:line``."""
    if config is not None:
        relcache.enable(model, config)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, steps, "cuda", dtype)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        if config is not None:
            relcache.disable(model)
    root = str(Path(relcache.__file__).parent.parent)
    return collections.Counter(f"{w.filename.removeprefix(root + '/')}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["XL"], choices=list(SIZES))
    parser.add_argument("--budget", type=int, default=14)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("syncs.py counts CUDA synchronisations: it needs a GPU")
    dtype = getattr(torch, args.dtype)
    for size in args.models:
        model = build(size, dtype, "cuda")
        generate(model, 3, "cuda", dtype)  # warm-up
        configs: dict[str, relcache.CacheConfig | None] = {"full": None, **methods(args.budget, None)}
        print(f"\nDiT-{size}/2 {args.dtype}, {args.steps} steps, NFC {args.budget}: syncs per generation")
        for name, config in configs.items():
            counts = count_syncs(model, config, args.steps, dtype)
            where = ", ".join(f"{loc} x{n}" for loc, n in counts.most_common())
            print(f"- {name}: {sum(counts.values())} ({where or 'none'})")


if __name__ == "__main__":
    main()
