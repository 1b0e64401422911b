"""``relcache demo``: full computation, FORA, TaylorSeer and RFC on the shipped model, as a PNG grid and a table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..evaluation.budgets import INTERVAL_FOR_NFC
from .options import DEMO_GRID, _budget, _output_png, _positive, _seed
from .reference import _reference

if TYPE_CHECKING:
    from ..evaluation.table import BenchResult


def save_grid(result: BenchResult, path: str | Path, per_row: int = 10) -> Path:
    """A PNG with one labelled row of samples per method, written at ``path`` exactly (no suffix is added)."""
    import matplotlib
    import torch

    from ..evaluation.runlog import whole

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result.samples)
    rows = {r.method: r for r in result.rows}
    fig, axes = plt.subplots(len(labels), 1, figsize=(per_row * 0.8 + 2.6, 0.9 * len(labels) + 0.3), squeeze=False)
    for ax, label in zip(axes[:, 0], labels, strict=True):
        imgs = result.samples[label][:per_row, 0].clamp(-1, 1)
        strip = torch.cat([torch.nn.functional.pad(im, (1, 1, 1, 1), value=-1.0) for im in imgs], dim=1)
        ax.imshow(strip.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        row = rows[label]
        ax.set_ylabel(f"{label}\nNFC {row.nfc:.0f}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Full computation, FORA, TaylorSeer and RFC at each budget on the reference model: grid and table."""
    import torch

    from ..evaluation.bench import BenchMethod, run_bench
    from ..evaluation.table import fmt
    from ..methods import FORA, RFC, TaylorSeer

    torch.manual_seed(args.seed)
    model, sampler, evaluator, real = _reference()
    methods = []
    for nfc in dict.fromkeys(args.budgets):  # a repeated budget runs once
        n = INTERVAL_FOR_NFC[nfc]
        methods += [BenchMethod(f"FORA NFC={nfc}", FORA(n), budget=nfc),
                    BenchMethod(f"TaylorSeer NFC={nfc}", TaylorSeer(n, 2), budget=nfc),
                    BenchMethod(f"RFC NFC={nfc}", RFC(order=2, target_nfc=nfc), budget=nfc)]
    start = time.perf_counter()
    result = run_bench(model, sampler, methods, num_samples=args.samples, batch_size=args.samples, seed=args.seed,
                       num_steps=50, guidance_scale=1.5, evaluator=evaluator, real_images=real, count_flops=False,
                       progress_label="demo")
    grid = save_grid(result, args.out)
    print(f"\nrelcache demo: reference DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
          f"DDIM 50 steps, CFG 1.5, {args.samples} samples, seed {args.seed}\n")
    print("| method | NFC | time s | speed-up | ideal 50/NFC | rel L1 vs full | digits-FID vs full | class acc % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result.rows:
        print(f"| {r.method} | {r.nfc:.0f} | {r.time_s:.2f} | {r.speedup:.2f}x | {50 / r.nfc:.2f}x | {r.rel_l1:.4f} | "
              f"{fmt(r.fid2fc, 3)} | {100 * r.accuracy:.1f} |")
    print("\ntime: one generation per method, so on a busy machine a speed-up can stray far, even past the ideal;"
          "\ndocs/performance.md has repeated measurements. The quality columns are the same on every run.")
    print(f"\nimage grid: {grid}   (total {time.perf_counter() - start:.0f} s)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``demo``'s options, as a subcommand of ``sub``."""
    p = sub.add_parser("demo", help="compare full computation, FORA, TaylorSeer and RFC on the shipped model",
                       description="Samples every digit class with full computation, FORA, TaylorSeer and RFC at "
                       "each budget (NFC of 50 DDIM steps) on the shipped reference DiT, writes a labelled PNG grid "
                       "and prints a table. Offline; under a minute on 2 CPU cores (36 s on an idle 2-core VM, "
                       "2026-12-06).")
    p.add_argument("--out", type=_output_png, default=DEMO_GRID,
                   help="path of the PNG grid, or a directory to write it in (default: %(default)s)")
    p.add_argument("--budgets", type=_budget, nargs="+", default=[14, 7],
                   help="NFC budgets of 50 steps, among 14 11 10 8 7 (default: 14 7)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--samples", type=_positive, default=20,
                   help="number of samples, classes cycling 0..9 (default: %(default)s)")
    p.set_defaults(func=run, parser=p)
