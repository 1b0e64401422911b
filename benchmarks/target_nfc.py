"""Target-NFC mode against a hand-tuned threshold at the same NFC, on the shipped reference model.

For each budget K, bisect RFC's threshold tau until one generation realizes NFC = K (the paper's way of
matching budgets), then generate the same seeds with ``RFC(target_nfc=K)`` and compare both against full
computation (relative L1 of the final samples, digits-FID against full computation).

    python benchmarks/target_nfc.py --budgets 14 11 10 8 7 --samples 50
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from common import generate, reference_parser

import relcache
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_evaluator, load_reference_transformer


def tune_threshold(model: torch.nn.Module, labels: torch.Tensor, seed: int, budget: int, iters: int = 14) -> float:
    """Bisect tau (log scale) so that the largest NFC over the batches is ``budget``; the most accurate tau
    among those realizing it is the smallest."""
    lo, hi = 1e-4, 10.0
    best = None
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        _, stats = generate(model, labels, seed, relcache.RFC(threshold=mid))
        nfc = max(st.nfc for st in stats)
        if nfc > budget:
            lo = mid
        else:
            hi = mid
            if nfc == budget:
                best = mid
    return best if best is not None else hi


def main() -> None:
    args = reference_parser(__doc__, [14, 11, 10, 8, 7], 50, "runs/target_nfc.json").parse_args()
    torch.manual_seed(args.seed)
    model, evaluator = load_reference_transformer(), load_evaluator()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)
    rows = []
    print("| K | tau (tuned) | NFC tuned | rel L1 tuned | FID2FC tuned | NFC target | rel L1 target | FID2FC target |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.budgets:
        tau = tune_threshold(model, labels, args.seed, k)
        tuned, stats_tuned = generate(model, labels, args.seed, relcache.RFC(threshold=tau))
        target, stats_target = generate(model, labels, args.seed, relcache.RFC(target_nfc=k))
        nfc_tuned, nfc_target = max(st.nfc for st in stats_tuned), max(st.nfc for st in stats_target)
        batches = [slice(b, b + 10) for b in range(0, len(labels), 10)]
        row = {"budget": k, "tau": tau, "nfc_tuned": nfc_tuned, "nfc_target": nfc_target,
               "rel_l1_tuned": relative_l1(tuned, full), "rel_l1_target": relative_l1(target, full),
               "fid2fc_tuned": digits_fid(evaluator, tuned, full), "fid2fc_target": digits_fid(evaluator, target, full),
               # per batch of 10 (one schedule each): where the schedules fall and which wins
               "batch_rel_l1_tuned": [relative_l1(tuned[b], full[b]) for b in batches],
               "batch_rel_l1_target": [relative_l1(target[b], full[b]) for b in batches],
               "full_steps_tuned": [st.full_steps for st in stats_tuned],
               "full_steps_target": [st.full_steps for st in stats_target]}
        rows.append(row)
        print(f"| {k} | {tau:.4g} | {nfc_tuned} | {row['rel_l1_tuned']:.4f} | {row['fid2fc_tuned']:.3f} | "
              f"{nfc_target} | {row['rel_l1_target']:.4f} | {row['fid2fc_target']:.3f} |")
    print("\nPer batch of 10: full steps of the first batch, how many batches share them, target wins on rel L1")
    for row in rows:
        wins = sum(t < u for t, u in zip(row["batch_rel_l1_target"], row["batch_rel_l1_tuned"], strict=True))
        for mode in ("tuned", "target"):
            steps = row[f"full_steps_{mode}"]
            print(f"K={row['budget']} {mode:6s} {steps[0]} (same in {steps.count(steps[0])} of {len(steps)})")
        print(f"K={row['budget']} target wins {wins} of {len(row['batch_rel_l1_target'])} batches")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "samples": args.samples,
                                          "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
