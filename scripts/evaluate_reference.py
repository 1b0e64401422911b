"""Compute the numbers of the reference model's card (full computation, no caching).

Generates ``--per-class`` samples of each digit with ``sample_digits`` (DDIM, batched CFG) from a
fixed seed, then reports the evaluator's class accuracy on them and their digits-FID against all
1,797 real digits, next to reference values (the evaluator's held-out accuracy and the digits-FID
between the real train and test splits, a floor for sample-vs-real FIDs at these set sizes).

    python scripts/evaluate_reference.py                      # 500 samples, DDIM 50, CFG 1.5
    python scripts/evaluate_reference.py --guidance 1.0       # no guidance
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from relcache.evaluation.digits import class_accuracy, digits_features, frechet_distance, load_digits_dataset
from relcache.evaluation.reference import WEIGHTS_DIR, load_evaluator, load_reference_transformer, sample_digits


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_row: int = 10) -> None:
    """Save the first ``per_row`` samples of each class as a class-per-row grid (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(10, per_row, figsize=(per_row * 0.6, 6.0))
    for digit in range(10):
        picks = images[labels == digit][:per_row]
        for j in range(per_row):
            ax = axes[digit, j]
            ax.axis("off")
            if j < len(picks):
                ax.imshow(picks[j, 0].numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.01, right=0.99, top=0.99, bottom=0.01)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250, help="samples per sampler call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path, default=None, help="optional PNG of samples (class per row)")
    parser.add_argument("--json", type=Path, default=None, help="optional path for the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    transformer = load_reference_transformer()
    evaluator = load_evaluator()
    labels = torch.arange(10).repeat_interleave(args.per_class)

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, len(labels), args.batch_size):
        batch = labels[i : i + args.batch_size]
        chunks.append(sample_digits(transformer, batch, args.steps, args.guidance, generator=gen))
    samples = torch.cat(chunks)
    sample_time = time.perf_counter() - t0

    real_all, _ = load_digits_dataset("all")
    real_train, _ = load_digits_dataset("train")
    real_test, test_labels = load_digits_dataset("test")
    feats_real = digits_features(evaluator, real_all)
    results = {
        "samples": len(labels),
        "per_class": args.per_class,
        "ddim_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "class_accuracy": round(class_accuracy(evaluator, samples, labels), 4),
        "digits_fid_vs_all_real": round(frechet_distance(digits_features(evaluator, samples), feats_real), 3),
        "evaluator_heldout_accuracy": round(class_accuracy(evaluator, real_test, test_labels), 4),
        "digits_fid_real_test_vs_real_train": round(
            frechet_distance(digits_features(evaluator, real_test), digits_features(evaluator, real_train)), 3
        ),
        "sampling_wall_time_s": round(sample_time, 1),
        "weights": str(WEIGHTS_DIR.relative_to(WEIGHTS_DIR.parents[4])),
    }
    if args.grid is not None:
        save_grid(samples, labels, args.grid)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
