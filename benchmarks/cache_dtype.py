"""Quality cost of holding the caches in lower precision, on the shipped reference model.

Generates the same seeds with full computation and with each method at each budget, once with float32
caches and once per lower-precision ``cache_dtype``, and reports the error against full computation
(relative L1 of the final samples, digits-FID against the full-computation samples), the gap between the
float32-cache and the low-precision-cache samples, and the memory the caches hold.

    python benchmarks/cache_dtype.py --budgets 14 7 --samples 50
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
from common import INTERVAL_FOR_NFC, generate, reference_parser
from tqdm import tqdm

import relcache
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_evaluator, load_reference_transformer


def main() -> None:
    parser = reference_parser(__doc__, [14, 7], 50, "runs/cache_dtype.json")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
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
        ref, ref_stats = generate(model, labels, args.seed, cfg)
        for dt in [None, *args.dtypes]:
            out, stats = (ref, ref_stats) if dt is None else generate(
                model, labels, args.seed, dataclasses.replace(cfg, cache_dtype=getattr(torch, dt)))
            mem = max(st.cache_bytes for st in stats)
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
