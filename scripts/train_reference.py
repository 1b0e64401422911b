"""Train the small reference DiT (diffusers ``DiTTransformer2DModel``) on sklearn's digits.

Recipe (DiT, scaled down to a 2-core CPU):

* data: all 1,797 sklearn digits, 8x8 -> bilinear 16x16 (``align_corners=False``) -> [-1, 1], pixel
  space, 1 channel (``relcache.evaluation.digits.load_digits_dataset``);
* model: ``DiTTransformer2DModel`` with ``norm_type="ada_norm_zero"`` (the DiT-XL/2 block design),
  patch 2 on 16x16 (64 tokens), 8 blocks, 4 heads x 32 (width 128), ``num_embeds_ada_norm=10``
  (row 10 of every label table is the null class used for classifier-free guidance);
* DiT initialisation: xavier-uniform linears, N(0, 0.02) label and timestep embeddings, and the
  adaLN modulations and the output layers zero-initialised (every block starts as identity);
* objective: epsilon prediction (MSE), linear betas 1e-4..0.02 over 1000 steps via
  ``diffusers.DDPMScheduler.add_noise``, uniform timesteps;
* label dropout 0.1 (label -> 10), done here with a seeded generator and *the same* dropped label
  for every block. diffusers' own ``LabelEmbedding`` dropout is switched off because, in train
  mode, it would draw an independent mask in each block's embedding (and again for the output
  layer), which is not the DiT recipe;
* AdamW (lr 1e-3, betas 0.9/0.999, no weight decay), 100 linear warmup steps then a constant lr
  as in DiT (``--schedule cosine`` decays to 10 % instead), gradient clipping at 1.0;
* bfloat16 autocast for the forward pass (about 1.5x faster on this CPU; master weights, optimiser
  state, loss and EMA stay float32);
* EMA of the weights (decay 0.999 with the usual ``(1+n)/(10+n)`` warm-up); the EMA copy ships, in
  float16, via ``save_pretrained``.

It writes ``loss_curve.csv`` and ``loss_curve.png`` next to the weights and a ``training_info.json``
summary. Run a short pilot first (``--steps 100 --out /tmp/pilot``) to measure seconds per step.

    python scripts/train_reference.py --steps 1500

With ``--max-minutes`` the run stops at a wall-time cap; ``training_info.json`` records the steps
done, and ``--steps <that number>`` reproduces the same weights (constant schedule).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding
from torch import nn

from relcache.evaluation.digits import load_digits_dataset, random_shift

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src/relcache/evaluation/reference/weights"
NUM_CLASSES = 10


def build_model(num_layers: int, heads: int, head_dim: int) -> DiTTransformer2DModel:
    """Construct the DiT and apply the DiT paper's initialisation."""
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj  # patchify conv, initialised like a linear layer
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            nn.init.normal_(module.embedding_table.weight, std=0.02)
            module.dropout_prob = 0.0  # label dropout is done in the loop (one mask for all blocks)
        if isinstance(module, TimestepEmbedding):
            nn.init.normal_(module.linear_1.weight, std=0.02)
            nn.init.normal_(module.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: gates start at 0
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    """Linear warmup to ``base``, then constant (DiT) or cosine decay to 10 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - decay)


@torch.no_grad()
def fixed_eval_loss(model: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, y: torch.Tensor) -> float:
    """Epsilon-MSE on a fixed (seeded) set of (image, t, noise) triples: comparable across models."""
    gen = torch.Generator().manual_seed(1234)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    total = 0.0
    for i in range(0, len(x0), 256):
        pred = model(xt[i : i + 256], timestep=t[i : i + 256], class_labels=y[i : i + 256]).sample
        total += F.mse_loss(pred, noise[i : i + 256], reduction="sum").item()
    return total / noise.numel()


def plot_curve(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, smooth = [], [], []
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            loss.append(float(row["loss"]))
            smooth.append(float(row["loss_smoothed"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss (mean over logging interval)")
    ax.plot(steps, smooth, lw=1.5, label="smoothed (bias-corrected EMA, 0.95)")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.set_title("Reference DiT on sklearn digits (16x16)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--shift-aug", type=int, default=0, help="max random shift in pixels (0 = off)")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in pure float32")
    parser.add_argument(
        "--threads", type=int, default=1, help="1 is faster than 2 when other processes share the cores"
    )
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--max-minutes", type=float, default=None,
        help="wall-time cap; the steps done are recorded, and '--steps <steps_done>' reproduces the "
        "run exactly with the constant schedule (nothing else depends on the planned total)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_dataset("all")
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    )
    model = build_model(args.num_layers, args.heads, args.head_dim)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.3f} M", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "loss_curve.csv"
    csv_file = csv_path.open("w", newline="")
    writer = csv.writer(csv_file)
    writer.writerow(["step", "loss", "loss_smoothed", "lr", "elapsed_s"])

    t0 = time.perf_counter()
    # Loss smoothing: a bias-corrected EMA (0.95 per logging interval) of the interval means.
    window, ema_acc, n_logged, smoothed, step = [], 0.0, 0, None, 0
    for step in range(1, args.steps + 1):
        lr = lr_at(step - 1, args.steps, args.lr, args.warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        if args.shift_aug:
            x0 = random_shift(x0, args.shift_aug, generator=gen)
        drop = torch.rand(args.batch_size, generator=gen) < args.label_dropout
        y[drop] = NUM_CLASSES
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = scheduler.add_noise(x0, noise, t)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))

        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(window) / len(window)
            ema_acc, n_logged = 0.95 * ema_acc + 0.05 * mean, n_logged + 1
            smoothed = ema_acc / (1.0 - 0.95**n_logged)
            elapsed = time.perf_counter() - t0
            writer.writerow([step, f"{mean:.6f}", f"{smoothed:.6f}", f"{lr:.3e}", f"{elapsed:.1f}"])
            window = []
            csv_file.flush()
            if step % (args.log_every * 10) == 0 or step == args.steps:
                print(
                    f"step {step:6d}  loss {mean:.4f}  smoothed {smoothed:.4f}  lr {lr:.2e}  "
                    f"{elapsed / step:.3f} s/step  elapsed {elapsed / 60:.1f} min",
                    flush=True,
                )
            if args.max_minutes is not None and elapsed > args.max_minutes * 60:
                print(f"max-minutes reached at step {step}", flush=True)
                break
    csv_file.close()
    wall = time.perf_counter() - t0

    model.eval()
    final_raw = fixed_eval_loss(model, scheduler, images, labels)
    final_ema = fixed_eval_loss(ema, scheduler, images, labels)
    print(f"fixed-noise eval loss: raw {final_raw:.4f}  EMA {final_ema:.4f}", flush=True)

    # nn.Module.to (not ModelMixin.to, which warns about fp32-only modules: DiT has none).
    nn.Module.to(ema, torch.float16).save_pretrained(args.out / "transformer", safe_serialization=True)
    plot_curve(csv_path, args.out / "loss_curve.png")
    info = {
        "command": f"python scripts/train_reference.py --steps {step} --batch-size {args.batch_size} "
        + f"--lr {args.lr} --schedule {args.schedule} --seed {args.seed}"
        + (f" --shift-aug {args.shift_aug}" if args.shift_aug else "")
        + ("" if args.bf16 else " --no-bf16"),
        "shift_aug": args.shift_aug,
        "steps_done": step,
        "params": n_params,
        "train_wall_time_s": round(wall, 1),
        "seconds_per_step": round(wall / step, 4),
        "final_loss_smoothed": round(smoothed, 5) if smoothed is not None else None,
        "final_fixed_eval_loss_raw": round(final_raw, 5),
        "final_fixed_eval_loss_ema": round(final_ema, 5),
        "torch": torch.__version__,
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2), flush=True)


if __name__ == "__main__":
    main()
