"""Where RFC's full steps fall against CFG-Cache's refresh steps, on the shipped reference model.

With CFG-Cache, the unconditional half runs only at refresh steps inside the window; its module caches are
updated only at steps that are both module-full and refresh steps. For each budget this prints the error of
RFC + CFG-Cache against full computation, RFC's full steps, the steps where the unconditional half ran, and
the steps that are both (one batch of 10 samples).

    python benchmarks/cfg_schedule.py --budgets 14 11 10 8 7
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from common import generate, reference_parser

import relcache
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_reference_transformer


def main() -> None:
    args = reference_parser(__doc__, [14, 11, 10, 8, 7], 10, "runs/cfg_schedule.json").parse_args()
    model = load_reference_transformer()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)
    rows = []
    for k in args.budgets:
        config = dataclasses.replace(relcache.RFC(target_nfc=k), cfg_cache=relcache.CFGCache())
        out, stats = generate(model, labels, args.seed, config)
        ctx = next(iter(stats[0].contexts.values()))
        skipped = set(ctx.uncond_skipped_steps)
        uncond_ran = [i for i in range(ctx.num_steps) if i not in skipped]
        both = [i for i in ctx.full_steps if i not in skipped]
        print(f"NFC {k}: rel L1 {relative_l1(out, full):.4f}\n  full steps        {ctx.full_steps}\n"
              f"  uncond half ran   {uncond_ran}\n  both              {both}")
        rows.append({"budget": k, "rel_l1": relative_l1(out, full), "full_steps": ctx.full_steps,
                     "uncond_ran": uncond_ran, "both": both})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"samples": args.samples, "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
