"""RFC(target_nfc=K) under several lower bounds on the gap between full steps (``schedules.GAP_FLOOR``: no gap
shorter than the even gap the rest of the budget allows divided by it; None: no bound), on the shipped reference
model and a second one: rel L1 against full computation over the 30 test samples (batches of 10 seeded 0, 1, 2, as
``benchmarks/plus.py``), per budget, and each variant's full steps of the first batch.

    python benchmarks/gap_floor.py --floors none 1.5 2 3 --budgets 7 8 10 11 14 16 18 20 22
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

import relcache
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import TRANSFORMER_DIR, sample_digits
from relcache.methods import schedules

SECOND = TRANSFORMER_DIR.parent / "second_seed1_shift1" / "transformer"


def floor(text: str) -> float | None:
    """A ``--floors`` value: a number above 1, or ``none``."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"a floor must be a number above 1 or 'none', got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floors", type=floor, nargs="+", default=[None, 1.5, 2.0, 3.0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[7, 8, 10, 11, 14, 16, 18, 20, 22])
    parser.add_argument("--models", nargs="+", default=["shipped", "second"], choices=["shipped", "second"])
    parser.add_argument("--samples", type=int, default=30, help="a multiple of 10")
    parser.add_argument("--out", default="runs/gap_floor.json")
    args = parser.parse_args()
    if args.samples % 10 or args.samples <= 0:
        parser.error(f"--samples must be a positive multiple of 10, got {args.samples}")
    if any(not 2 < k < 50 for k in args.budgets):
        parser.error(f"--budgets must lie in 3..49, got {args.budgets}")
    kept = schedules.GAP_FLOOR
    labels = torch.arange(args.samples) % 10
    rows = []
    try:
        for name in args.models:
            model = DiTTransformer2DModel.from_pretrained(TRANSFORMER_DIR if name == "shipped" else SECOND,
                                                          torch_dtype=torch.float32, local_files_only=True,
                                                          low_cpu_mem_usage=False).eval()
            batches = list(labels.split(10))
            refs = [sample_digits(model, b, generator=torch.Generator().manual_seed(i)) for i, b in enumerate(batches)]
            for k in args.budgets:
                line = [f"{name:8s} K={k:2d}"]
                for f in args.floors:
                    schedules.GAP_FLOOR = f
                    outs, steps = [], None
                    for i, b in enumerate(batches):
                        relcache.enable(model, relcache.RFC(target_nfc=k))
                        try:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                outs.append(sample_digits(model, b, generator=torch.Generator().manual_seed(i)))
                            steps = steps or relcache.stats(model).full_steps
                        finally:
                            relcache.disable(model)
                    err = float(relative_l1(torch.cat(outs), torch.cat(refs)))
                    rows.append({"model": name, "budget": k, "floor": f, "rel_l1": err, "full_steps": steps})
                    line.append(f"floor {f}: {err:.4f}")
                print(" | ".join(line), flush=True)
    finally:
        schedules.GAP_FLOOR = kept
    for r in rows:
        print(r["model"], r["budget"], r["floor"], r["full_steps"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1))
    print("written:", args.out)


if __name__ == "__main__":
    main()
