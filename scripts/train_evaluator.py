"""Train the digits classifier used as the offline evaluator (class accuracy and digits-FID).

Trains ``relcache.evaluation.digits.DigitsClassifier`` on the fixed train split of sklearn's
digits (16x16, [-1, 1]) with +-1 pixel random shifts, reports held-out accuracy and ships
``weights/evaluator.safetensors`` plus ``weights/evaluator_config.json``.

    python scripts/train_evaluator.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from relcache.evaluation.digits import DigitsClassifier, class_accuracy, load_digits_dataset, random_shift

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/relcache/evaluation/reference/weights"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_dataset("train")
    x_test, y_test = load_digits_dataset("test")

    model = DigitsClassifier()
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = random_shift(x_train[idx], 1, generator=gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            acc = class_accuracy(model, x_test, y_test)
            mean_loss = total / len(x_train)
            print(f"epoch {epoch + 1:3d}  loss {mean_loss:.4f}  held-out acc {acc:.4f}", flush=True)
    wall = time.perf_counter() - t0

    model.eval()
    test_acc = class_accuracy(model, x_test, y_test)
    train_acc = class_accuracy(model, x_train, y_train)
    print(f"train acc {train_acc:.4f}  held-out acc {test_acc:.4f}  ({wall:.1f} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "evaluator.safetensors")
    meta = {
        "architecture": "relcache.evaluation.digits.DigitsClassifier",
        "config": model.config,
        "input": "(N, 1, 16, 16) in [-1, 1]; sklearn digits 8x8 -> bilinear 16x16 (align_corners=False)",
        "split": "sklearn train_test_split(test_size=0.25, random_state=0, stratify=labels)",
        "train_size": len(x_train),
        "test_size": len(x_test),
        "train_accuracy": round(train_acc, 4),
        "heldout_accuracy": round(test_acc, 4),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "augmentation": "random +-1 pixel shifts, background fill",
        "train_wall_time_s": round(wall, 1),
        "command": "python scripts/train_evaluator.py",
    }
    (args.out / "evaluator_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {args.out / 'evaluator.safetensors'}")


if __name__ == "__main__":
    main()
