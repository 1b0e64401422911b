"""Two checks behind docs/results.md, on the shipped reference model, same seeds as full computation.

* Interval phase: FORA, TaylorSeer and RFE alone on the spec's schedule (full at ``i < warmup`` and every
  ``N`` after the last warm-up step) and on diffusers' TaylorSeer schedule (full at ``i < warmup`` and at
  ``(i - warmup - 1) % N == 0``: a short first gap, the last steps forecast).
* FasterCache variants: the preset's schedule against diffusers' (refresh steps counted from step 0, attention
  computed at every step that runs both halves, its ranges mapped on this sampler's timesteps), the rising weight
  against diffusers' constant 0.5, compounding deltas, and without CFG-Cache; and diffusers' FasterCache itself.

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

#: the schedule of diffusers' FasterCache on this sampler (docs/results.md): attention forecast from step 15 (its
#: (-1, 681) range) at odd steps, the unconditional half skipped from step 17 (its (-1, 641) range) with the
#: refresh steps counted from step 0, and attention computed at every step that runs both halves
DIFFUSERS_SCHEDULE: dict[str, object] = {"warmup": 15, "cfg_window": (0.34, 1.0), "cfg_phase": "step0",
                                         "cfg_refresh_full": True}
#: FasterCache variants, as keyword arguments of ``relcache.FasterCache``
FASTERCACHE: list[dict[str, object]] = [
    {}, {"cfg_refresh_full": True}, {"cfg_phase": "step0"}, {"cfg_phase": "step0", "cfg_refresh_full": True},
    DIFFUSERS_SCHEDULE, {**DIFFUSERS_SCHEDULE, "weight": 0.5}, {**DIFFUSERS_SCHEDULE, "compound": True},
    {**DIFFUSERS_SCHEDULE, "weight": 0.5, "compound": True}, {"cfg": False}, {"weight": 0.5},
]


def diffusers_fastercache_row(model: torch.nn.Module, labels: torch.Tensor, seed: int, full: torch.Tensor,
                              evaluator: torch.nn.Module) -> dict[str, object]:
    """diffusers' FasterCache with its defaults (the bench's peer), same seeds; FLOPs by torch's counter against
    full computation's, per batch of 10."""
    from relcache.evaluation.peers.diffusers import DiffusersFasterCache
    from relcache.evaluation.reference import sample_digits
    from relcache.runtime.accounting import measure_flops

    peer, outs, ratios = DiffusersFasterCache(), [], []
    for b, batch in enumerate(labels.split(10)):
        def full_once(batch: torch.Tensor = batch, b: int = b) -> torch.Tensor:
            return sample_digits(model, batch, generator=torch.Generator().manual_seed(seed + b))
        full_flops = measure_flops(full_once)
        peer.attach(model)
        try:
            def once(batch: torch.Tensor = batch, b: int = b) -> torch.Tensor:
                peer.before_generation(model)
                return sample_digits(model, batch, generator=torch.Generator().manual_seed(seed + b))
            outs.append(once())
            ratios.append(measure_flops(once) / full_flops)
        finally:
            peer.detach(model)
    out = torch.cat(outs)
    return {"method": peer.label, "nfc": None, "flops_ratio": sum(ratios) / len(ratios),
            "rel_l1": relative_l1(out, full), "fid2fc": digits_fid(evaluator, out, full)}


def main() -> None:
    parser = reference_parser(__doc__, [14, 7], 30, "runs/variants.json")
    parser.add_argument("--fastercache-only", action="store_true",
                        help="only the FasterCache variants and diffusers' FasterCache")
    parser.add_argument("--peer", action="store_true", help="also diffusers' FasterCache (always with "
                        "--fastercache-only)")
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
    if args.fastercache_only or args.peer:
        rows.append(diffusers_fastercache_row(model, labels, args.seed, full, evaluator))
    print("| method | NFC | FLOPs ratio | rel L1 vs full | digits-FID2FC |")
    print("|---|---|---|---|---|")
    for r in rows:
        nfc = "n/a" if r["nfc"] is None else r["nfc"]
        print(f"| {r['method']} | {nfc} | {r['flops_ratio']:.3f} | {r['rel_l1']:.4f} | {r['fid2fc']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "samples": args.samples,
                                          "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
