"""RFC and TaylorSeer with CFG-Cache against themselves alone, on the shipped reference model (same seeds as full
computation), with CFG-Cache aligned to the module schedule's full steps (``align=True``, the default; the paper's
schedule, ``align=False``, is the bench's old "RFC + CFG-Cache" row).

For each budget it prints model FLOPs ratio and rel L1 against full computation, the full steps and the steps
where the unconditional half ran (first batch), and then the Pareto check docs/results.md states: a method with
CFG-Cache must have an error at most that of the same method alone at the budget with the nearest model FLOPs not
below its own.

    python benchmarks/cfg_schedule.py --budgets 14 11 10 8 7 --samples 30
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from common import INTERVAL_FOR_NFC, generate, reference_parser

import relcache
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_reference_transformer

#: "+ CFG-Cache" is the default (``skip_full=None``: with a schedule that caches, it skips at no full step, so the
#: combination is the method alone); "skip_full=True" skips at full steps with the default window
VARIANTS = {"alone": None, "+ CFG-Cache": relcache.CFGCache(),
            "+ CFG-Cache skip_full=True": relcache.CFGCache(skip_full=True)}


def variants(windows: list[float]) -> dict[str, relcache.CFGCache | None]:
    """"alone", the default CFG-Cache, CFG-Cache skipping at full steps (``skip_full=True``), and that with each
    window start in ``windows`` (to the last step)."""
    out = dict(VARIANTS)
    for w in windows:
        out[f"+ CFG-Cache skip_full window ({w}, 1.0)"] = relcache.CFGCache(window=(w, 1.0), skip_full=True)
    return out


def pareto(rows: list[dict], base: str, variant: str) -> list[str]:
    """For each ``base + variant`` row: the ``base alone`` row with the nearest FLOPs not below it, and the verdict."""
    alone = sorted((r for r in rows if r["method"] == base and r["variant"] == "alone"), key=lambda r: r["flops_ratio"])
    lines = []
    for r in (r for r in rows if r["method"] == base and r["variant"] == variant):
        ref = next((a for a in alone if a["flops_ratio"] >= r["flops_ratio"] - 1e-12), None)
        if ref is None:
            lines.append(f"{base} {r['budget']} {variant}: FLOPs {r['flops_ratio']:.3f} above every {base} alone")
            continue
        ok = r["rel_l1"] <= ref["rel_l1"]
        lines.append(f"{base} NFC {r['budget']} {variant}: FLOPs {r['flops_ratio']:.3f}, rel L1 {r['rel_l1']:.4f}"
                     f" | {base} alone NFC {ref['budget']}: FLOPs {ref['flops_ratio']:.3f}, rel L1 {ref['rel_l1']:.4f}"
                     f" | {'holds' if ok else 'FAILS'}")
    return lines


def main() -> None:
    parser = reference_parser(__doc__, [14, 11, 10, 8, 7], 30, "runs/cfg_schedule.json")
    parser.add_argument("--windows", nargs="*", type=float, default=[],
                        help="also CFG-Cache with the window (w, 1.0) for each w (step fractions)")
    parser.add_argument("--methods", nargs="+", default=["RFC", "TaylorSeer"], choices=["RFC", "TaylorSeer"])
    args = parser.parse_args()
    configs = variants(args.windows)
    model = load_reference_transformer()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)
    rows = []
    for k in args.budgets:
        bases = (("RFC", relcache.RFC(target_nfc=k)), ("TaylorSeer", relcache.TaylorSeer(INTERVAL_FOR_NFC[k])))
        for method, base in (b for b in bases if b[0] in args.methods):
            for variant, cfg in configs.items():
                out, stats = generate(model, labels, args.seed, dataclasses.replace(base, cfg_cache=cfg))
                ctx = next(iter(stats[0].contexts.values()))
                skipped = set(ctx.uncond_skipped_steps)
                row = {"method": method, "variant": variant, "budget": k, "nfc": max(st.nfc for st in stats),
                       "flops_ratio": sum(st.model_flops_fraction for st in stats) / len(stats),
                       "rel_l1": relative_l1(out, full), "full_steps": ctx.full_steps,
                       "uncond_ran": [i for i in range(ctx.num_steps) if i not in skipped]}
                rows.append(row)
                print(f"{method} NFC {k} {variant}: FLOPs {row['flops_ratio']:.3f} rel L1 {row['rel_l1']:.4f}\n"
                      f"  full steps      {row['full_steps']}\n  uncond half ran {row['uncond_ran']}", flush=True)
    print()
    for method in args.methods:
        for variant in list(configs)[1:]:
            print("\n".join(pareto(rows, method, variant)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "samples": args.samples,
                                          "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
