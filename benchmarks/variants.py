"""Two checks behind docs/results.md, on the shipped reference model, same seeds as full computation.

* Interval phase: FORA, TaylorSeer and RFE alone on the spec's schedule (full at ``i < warmup`` and every
  ``N`` after the last warm-up step) and on diffusers' TaylorSeer schedule (full at ``i < warmup`` and at
  ``(i - warmup - 1) % N == 0``: a short first gap, the last steps forecast).
* FasterCache variants: the rising weight against diffusers' constant 0.5, with and without CFG-Cache, and CFG-Cache
  aligned with the attention schedule's full steps (the default) or on the paper's schedule (``cfg_align=False``).

    python benchmarks/variants.py --budgets 14 11 10 8 7 --samples 30
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from common import INTERVAL_FOR_NFC, generate, reference_parser
from tqdm import tqdm

import relcache
from relcache import CacheConfig, Interval, Relational, Reuse, Taylor
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_evaluator, load_reference_transformer

#: FasterCache variants, as keyword arguments of ``relcache.FasterCache``
FASTERCACHE: list[dict[str, object]] = [
    {}, {"cfg_align": False}, {"cfg": False}, {"weight": 0.5}, {"weight": 0.5, "cfg_align": False},
    {"weight": 0.5, "cfg": False},
]


def main() -> None:
    parser = reference_parser(__doc__, [14, 7], 30, "runs/variants.json")
    parser.add_argument("--fastercache-only", action="store_true", help="only the FasterCache variants")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, evaluator = load_reference_transformer(), load_evaluator()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)
    jobs: list[tuple[str, relcache.CacheConfig]] = []
    for k in [] if args.fastercache_only else args.budgets:
        n = INTERVAL_FOR_NFC[k]
        for name, pred in [("FORA", Reuse()), ("TaylorSeer m=2", Taylor(2)), ("RFE alone m=2", Relational(2))]:
            jobs.append((f"{name} N={n}, spec phase", CacheConfig(pred, Interval(n, 2))))
            jobs.append((f"{name} N={n}, diffusers phase", CacheConfig(pred, Interval(n, 2, phase="diffusers"))))
    for kw in FASTERCACHE:
        label = ", ".join(f"{k}={v}" for k, v in kw.items())
        jobs.append((f"FasterCache({label})", relcache.FasterCache(**kw)))
    rows = []
    for label, config in tqdm(jobs, desc="variants"):
        out, stats = generate(model, labels, args.seed, config)
        rows.append({"method": label, "nfc": max(st.nfc for st in stats),
                     "flops_ratio": sum(st.model_flops_fraction for st in stats) / len(stats),
                     "rel_l1": relative_l1(out, full), "fid2fc": digits_fid(evaluator, out, full)})
    print("| method | NFC | FLOPs ratio | rel L1 vs full | digits-FID2FC |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['nfc']} | {r['flops_ratio']:.3f} | {r['rel_l1']:.4f} | {r['fid2fc']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "samples": args.samples,
                                          "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
