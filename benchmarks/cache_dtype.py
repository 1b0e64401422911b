"""Quality cost of holding the caches in lower precision, on the shipped reference model.

Generates the same seeds with full computation and with each method at each budget, once with float32
caches and once per lower-precision ``cache_dtype``, and reports the error against full computation
(relative L1 of the final samples, digits-FID against the full-computation samples), the gap between the
float32-cache and the low-precision-cache samples, and the memory the caches hold.

    python benchmarks/cache_dtype.py --budgets 14 7 --samples 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import relcache
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.models.reference import load_evaluator, load_reference_transformer, sample_digits

INTERVAL_FOR_NFC = {14: 4, 11: 5, 10: 6, 8: 7, 7: 9}


def generate(model: torch.nn.Module, labels: torch.Tensor, seed: int, config: relcache.CacheConfig | None,
             ) -> tuple[torch.Tensor, int]:
    """(samples, cache bytes) of one generation per batch of 10 with ``config`` (None = full computation)."""
    outs, mem = [], 0
    for b, batch in enumerate(labels.split(10)):
        if config is not None:
            relcache.enable(model, config)
        try:
            outs.append(sample_digits(model, batch, generator=torch.Generator().manual_seed(seed + b)))
            mem = max(mem, relcache.stats(model).cache_bytes) if config is not None else 0
        finally:
            if config is not None:
                relcache.disable(model)
    return torch.cat(outs), mem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=int, default=[14, 7], choices=list(INTERVAL_FOR_NFC))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cache_dtype.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, evaluator = load_reference_transformer(), load_evaluator()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)

    def methods(k: int) -> dict[str, relcache.CacheConfig]:
        n = INTERVAL_FOR_NFC[k]
        return {f"TaylorSeer N={n} m=2": relcache.TaylorSeer(n, 2), f"RFC NFC={k} m=2": relcache.RFC(target_nfc=k)}

    jobs = [(k, name, cfg) for k in args.budgets for name, cfg in methods(k).items()]
    rows = []
    for k, name, cfg in tqdm(jobs, desc="cache dtypes"):
        ref, ref_mem = generate(model, labels, args.seed, cfg)
        for dt in [None, *args.dtypes]:
            out, mem = (ref, ref_mem) if dt is None else generate(
                model, labels, args.seed, dataclasses.replace(cfg, cache_dtype=getattr(torch, dt)))
            rows.append({"budget": k, "method": name, "cache_dtype": dt or "float32",
                         "rel_l1": relative_l1(out, full), "fid2fc": digits_fid(evaluator, out, full),
                         "rel_l1_vs_float32_cache": relative_l1(out, ref), "cache_mib": mem / 2**20})
    print("| method | cache dtype | rel L1 vs full | digits-FID2FC | rel L1 vs float32 cache | cache MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['cache_dtype']} | {r['rel_l1']:.4f} | {r['fid2fc']:.3f} | "
              f"{r['rel_l1_vs_float32_cache']:.4f} | {r['cache_mib']:.2f} |")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "samples": args.samples, "seed": args.seed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
