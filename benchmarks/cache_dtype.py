"""Quality cost of holding the caches in lower precision, on the shipped reference model.

Generates the same seeds with full computation and with each method at each budget, once with float32
caches and once per lower-precision storage (``cache_dtype``: a dtype, or a ``CacheStorage`` per role), and
reports the error against full computation (relative L1 of the final samples, digits-FID against the
full-computation samples), the gap between the float32-cache and the low-precision-cache samples, the memory
the caches hold at their peak, and the wall time of each generation relative to the float32-cache one
(measured in this run, interleaved: a ratio; on a shared CPU it is noisy).

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
from relcache import CacheStorage
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_evaluator, load_reference_transformer

F8, BF16 = torch.float8_e4m3fn, torch.bfloat16
#: the storages compared: name -> ``cache_dtype`` (None: float32, as the reference model computes)
STORAGES: dict[str, object] = {
    "float32": None,
    "bfloat16": BF16,
    "float16": torch.float16,
    "bf16 base+input, float8 diffs": CacheStorage(BF16, F8, BF16),
    "float8": CacheStorage(F8, F8, F8, "token"),
    "float8 per-channel": CacheStorage(F8, F8, F8, "channel"),
    "float8 per-sample": CacheStorage(F8, F8, F8, "sample"),
    "float8, int4 diffs": CacheStorage(F8, "int4", F8),
    "bf16 base+input, int4 diffs": CacheStorage(BF16, "int4", BF16),
    "float8 base only": CacheStorage(F8, BF16, BF16),
    "float8 input only": CacheStorage(BF16, BF16, F8),
    "int8": CacheStorage("int8", "int8", "int8"),
    "int8, int4 diffs": CacheStorage("int8", "int4", "int8"),
    "int8 per-channel, int4 diffs": CacheStorage("int8", "int4", "int8", "channel"),
    "int8 base only": CacheStorage("int8", BF16, BF16),
    "int8 input only": CacheStorage(BF16, BF16, "int8"),
}


def main() -> None:
    parser = reference_parser(__doc__, [14, 7], 50, "runs/cache_dtype.json")
    parser.add_argument("--dtypes", nargs="+", default=[k for k in STORAGES if k != "float32"],
                        choices=[k for k in STORAGES if k != "float32"], help="storages besides float32")
    parser.add_argument("--methods", nargs="+", default=["TaylorSeer", "RFC"], choices=["FORA", "TaylorSeer", "RFC"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, evaluator = load_reference_transformer(), load_evaluator()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)

    def methods(k: int) -> dict[str, relcache.CacheConfig]:
        n = INTERVAL_FOR_NFC[k]
        every = {"FORA": (f"FORA N={n}", relcache.FORA(n)), "TaylorSeer": (f"TaylorSeer N={n} m=2",
                 relcache.TaylorSeer(n, 2)), "RFC": (f"RFC NFC={k} m=2", relcache.RFC(target_nfc=k))}
        return dict(every[m] for m in args.methods)

    def timed(cfg: relcache.CacheConfig) -> tuple[torch.Tensor, list[relcache.CacheStats], float]:
        start = time.perf_counter()
        out, stats = generate(model, labels, args.seed, cfg)
        return out, stats, time.perf_counter() - start

    jobs = [(k, name, cfg) for k in args.budgets for name, cfg in methods(k).items()]
    rows = []
    for k, name, cfg in tqdm(jobs, desc="cache storages"):
        ref, ref_stats, ref_time = timed(cfg)
        for dt in ["float32", *args.dtypes]:
            out, stats, took = (ref, ref_stats, ref_time) if dt == "float32" else timed(
                dataclasses.replace(cfg, cache_dtype=STORAGES[dt]))
            mem = max(st.peak_cache_bytes for st in stats)
            rows.append({"budget": k, "method": name, "cache_dtype": dt,
                         "rel_l1": relative_l1(out, full), "fid2fc": digits_fid(evaluator, out, full),
                         "rel_l1_vs_float32_cache": relative_l1(out, ref), "cache_mib": mem / 2**20,
                         "time_vs_float32_cache": took / ref_time})
            tqdm.write(str(rows[-1]))
    print("| method | cache storage | rel L1 vs full | digits-FID2FC | rel L1 vs float32 cache | peak cache MiB | "
          "generation time / float32-cache time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['cache_dtype']} | {r['rel_l1']:.4f} | {r['fid2fc']:.3f} | "
              f"{r['rel_l1_vs_float32_cache']:.4f} | {r['cache_mib']:.2f} | {r['time_vs_float32_cache']:.2f} |")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "samples": args.samples, "seed": args.seed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
