"""The ``relcache`` command: ``demo``, ``bench`` and ``analyze``.

All three run offline on the shipped reference model by default. ``bench`` also takes a local diffusers pipeline
directory of any supported family (``--model PATH``: DiT, PixArt, SD3, FLUX, Wan, CogVideoX, HunyuanVideo, Latte),
``analyze`` a local ``DiTPipeline`` directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .evaluation.bench import (
    INTERVAL_FOR_NFC,
    BenchMethod,
    BenchResult,
    Sampler,
    default_methods,
    run_bench,
    select,
)
from .evaluation.pipelines import DEFAULT_PROMPTS, FAMILY_NAMES
from .evaluation.ranks import RankLostError
from .evaluation.runlog import command_line
from .methods import FORA, RFC, TaylorSeer
from .models.base import find_adapter

#: the demo grid's file name, also used inside a directory given as ``demo --out``
DEMO_GRID = "relcache-demo.png"


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``."""

    def parse(value: str) -> int:
        n = int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return n

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its error for a non-integer
    return parse


_positive, _at_least_2, _index = _int_at_least(1), _int_at_least(2), _int_at_least(0)


def _guidance(value: str) -> float:
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1 or less: no guidance), got {value}")
    return x


def _dit_pipeline_dir(value: str) -> str:
    """A local diffusers DiTPipeline directory (``analyze``): checked here, so a wrong path fails at once (and never
    reaches the Hub, which ``from_pretrained`` would ask about a name such as ``nosuch/model``)."""
    path = Path(value).expanduser()
    need = "must be a local diffusers DiTPipeline directory (with a model_index.json)"
    if not path.is_dir():
        reason = "is not a directory" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{need}; {value} {reason}")
    index = path / "model_index.json"
    if not index.is_file():
        raise argparse.ArgumentTypeError(f"{need}; {value} has no model_index.json")
    try:
        pipeline_class = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise argparse.ArgumentTypeError(f"{need}; cannot read {index}: {err}") from None
    if pipeline_class != "DiTPipeline":
        raise argparse.ArgumentTypeError(f"{need}; {value} holds a {pipeline_class}")
    return str(path)


def _pipeline_dir(value: str) -> str:
    """A local diffusers pipeline directory of a supported family (``bench``), recognised from its model_index.json
    alone, before anything is loaded."""
    from .evaluation.pipelines import FAMILY_NAMES, inspect_dir

    try:
        inspect_dir(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a local diffusers pipeline directory of a supported family "
                                         f"({FAMILY_NAMES}) with a model_index.json; {err}") from None
    return str(Path(value).expanduser())


@dataclass(frozen=True)
class PromptFile:
    """``--prompts FILE``: where the prompts came from (recorded with the run) and the prompts."""

    path: str
    prompts: list[str]


def _prompts_file(value: str) -> PromptFile:
    from .evaluation.pipelines import read_prompts

    try:
        return PromptFile(str(Path(value).expanduser().resolve()), read_prompts(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a text file with one prompt a line; {err}") from None


def _size(value: str) -> int:
    n = int(value)
    if n < 8 or n % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (pixels), got {value}")
    return n


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be written in ``directory`` (created with its parents if missing), or None if they can.

    Checked before any work, so a bad output location does not lose a finished run. Nothing is created: the nearest
    existing ancestor must be a directory a file can be created in (tried with a temporary file, which also tells
    root the truth about read-only file systems)."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"cannot write in {existing}: {err.strerror or err}"
    return None


def _output_dir(value: str) -> Path:
    path = Path(value).expanduser()
    reason = _unwritable(path)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write the results in {value}: {reason}")
    return path


def _output_png(value: str) -> Path:
    """The grid's file: ``value`` itself if it ends in .png, ``value`` + .png without a suffix, or
    ``relcache-demo.png`` inside ``value`` when it is a directory (or ends with a slash)."""
    path = Path(value).expanduser()
    if value.endswith(("/", os.sep)) or path.is_dir():
        path = path / DEMO_GRID
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the grid is a PNG: name a .png file or a directory, got {value}")
    reason = _unwritable(path.parent)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write the grid {path}: {reason}")
    return path


def _budget(value: str) -> int:
    n = int(value)
    if n not in INTERVAL_FOR_NFC:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(INTERVAL_FOR_NFC)} (NFC of 50 steps), got {value}")
    return n


def _reference() -> tuple[torch.nn.Module, Sampler, torch.nn.Module, torch.Tensor]:
    """(transformer, sampler, evaluator, real images) of the shipped reference model."""
    from .evaluation.digits import load_digits_dataset
    from .evaluation.reference import load_evaluator, load_reference_transformer, sample_digits

    real, _ = load_digits_dataset("all")
    return load_reference_transformer(), sample_digits, load_evaluator(), real


def _pipeline_sampler(path: str) -> tuple[torch.nn.Module, Sampler]:
    """(transformer, sampler) of a local DiTPipeline directory (``analyze``); samples are mapped to [-1, 1]."""
    from diffusers import DiTPipeline

    from .api import begin_generation

    pipe = DiTPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def sample(transformer: torch.nn.Module, labels: torch.Tensor, num_steps: int = 50, guidance_scale: float = 1.5,
               generator: torch.Generator | None = None) -> torch.Tensor:
        # caching is enabled on the bare transformer, so the pipeline's scheduler is not watched: announce the steps
        # (RFC(target_nfc=...) needs them; a no-op when caching is off)
        begin_generation(transformer, num_steps)
        out = pipe(labels.tolist(), num_inference_steps=num_steps, guidance_scale=guidance_scale,
                   generator=generator, output_type="pt")
        return out.images * 2 - 1 if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images) * 2 - 1

    return pipe.transformer, sample


def save_grid(result: BenchResult, path: str | Path, per_row: int = 10) -> Path:
    """A PNG with one labelled row of samples per method, written at ``path`` exactly (no suffix is added)."""
    import matplotlib

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
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def demo(args: argparse.Namespace) -> int:
    """Full computation, FORA, TaylorSeer and RFC at each budget on the reference model: grid and table."""
    torch.manual_seed(args.seed)
    model, sampler, evaluator, real = _reference()
    methods = []
    for nfc in args.budgets:
        n = INTERVAL_FOR_NFC[nfc]
        methods += [BenchMethod(f"FORA NFC={nfc}", FORA(n), budget=nfc),
                    BenchMethod(f"TaylorSeer NFC={nfc}", TaylorSeer(n, 2), budget=nfc),
                    BenchMethod(f"RFC NFC={nfc}", RFC(order=2, target_nfc=nfc), budget=nfc)]
    start = time.perf_counter()
    result = run_bench(model, sampler, methods, num_samples=args.samples, batch_size=args.samples, seed=args.seed,
                       num_steps=50, guidance_scale=1.5, evaluator=evaluator, real_images=real, count_flops=False)
    grid = save_grid(result, args.out)
    print(f"\nrelcache demo: reference DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
          f"DDIM 50 steps, CFG 1.5, {args.samples} samples, seed {args.seed}\n")
    print("| method | NFC | time s | speed-up | ideal 50/NFC | rel L1 vs full | digits-FID vs full | class acc % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result.rows:
        print(f"| {r.method} | {r.nfc:.0f} | {r.time_s:.2f} | {r.speedup:.2f}x | {50 / r.nfc:.2f}x | {r.rel_l1:.4f} | "
              f"{r.fid2fc:.3f} | {100 * r.accuracy:.1f} |")
    print("\ntime: one generation per method, so on a busy machine a speed-up can stray far, even past the ideal;"
          "\ndocs/performance.md has repeated measurements. The quality columns are the same on every run.")
    print(f"\nimage grid: {grid}   (total {time.perf_counter() - start:.0f} s)")
    return 0


def _bench_inputs(args: argparse.Namespace) -> tuple[Any, list[int], dict[str, Any]]:
    """(family or None for the reference model, the conditions cycled over, the settings they add): every
    combination of options checked before anything is loaded."""
    from .evaluation.pipelines import DEFAULT_PROMPTS, check_frames, inspect_dir, num_classes

    family = inspect_dir(args.model)[1] if args.model else None
    name = family.name if family else "the reference model"
    if args.peers and family is not None and family.name != "dit":
        raise ConfigError(f"--peers runs on the reference model and DiT pipelines, not on {family.name}")
    if family is None:
        for option in ("height", "width", "frames"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} is for --model pipelines; the reference model makes 16x16 digits")
    elif args.frames is not None:
        try:
            check_frames(family, args.frames)
        except ValueError as err:
            raise ConfigError(f"argument --frames: {err}") from None
    extra: dict[str, Any] = {"model": str(Path(args.model).resolve()) if args.model else "reference",
                             "family": family.name if family else "reference"}
    if family is not None and family.text:
        if args.labels is not None:
            raise ConfigError(f"--labels is for class-conditional models; {name} takes --prompts FILE")
        prompts = args.prompts.prompts if args.prompts else list(DEFAULT_PROMPTS)
        conditions = list(range(len(prompts)))
        extra["prompts"] = {"source": args.prompts.path if args.prompts else "built-in", "count": len(prompts),
                            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    else:
        if args.prompts is not None:
            raise ConfigError(f"--prompts is for text-conditioned models; {name} takes --labels")
        classes = num_classes(args.model) if args.model else 10
        conditions = args.labels if args.labels is not None else list(range(classes or 1000))
        bad = [c for c in conditions if classes is not None and not 0 <= c < classes]
        if bad:
            raise ConfigError(f"argument --labels: must be classes in 0..{classes - 1}, got {' '.join(map(str, bad))}")
    extra.update(frames=args.frames, height=args.height, width=args.width)
    return family, conditions, extra


def _bench_guidance(args: argparse.Namespace, family: Any) -> float | None:
    if args.guidance is not None:
        return args.guidance
    return 1.5 if family is None else family.default_guidance


def bench(args: argparse.Namespace) -> int:
    """The evaluation table and pictures: methods x budgets against full computation, on the reference model or a
    local pipeline of a supported family. Every finished generation is recorded as it ends (``--resume``)."""
    from .evaluation import runlog
    from .evaluation.bench import bench_settings

    if args.peers and args.steps != 50:
        raise ConfigError(f"--peers needs --steps 50 (the peers' thresholds are calibrated for 50 steps), "
                          f"got --steps {args.steps}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    family, conditions, extra = _bench_inputs(args)
    guidance = _bench_guidance(args, family)
    if runlog.has_log(args.out) and not (args.resume or args.overwrite):
        header = runlog.read_header(args.out) or {}
        raise ConfigError(f"--out {args.out} holds an earlier run (started {header.get('date')}, command: "
                          f"{header.get('command')}): pass --resume to continue it, --overwrite to start over, or "
                          "another --out")
    if args.resume:  # the settings known before loading anything (run_bench compares the methods too)
        runlog.check_resumable(args.out, bench_settings(
            num_samples=args.samples, batch_size=args.batch_size, num_classes=len(conditions), seed=args.seed,
            num_steps=args.steps, guidance_scale=guidance, count_flops=not args.no_flops, conditions=conditions,
            extra=extra), runlog.versions())
    if args.model:
        from .evaluation.pipelines import load_sampler

        model, sampler = load_sampler(args.model, family, prompts=args.prompts.prompts if args.prompts else None,
                                      frames=args.frames, height=args.height, width=args.width)
        evaluator = real = None
    else:
        model, sampler, evaluator, real = _reference()
    methods = default_methods(args.budgets, order=args.order, num_steps=args.steps)
    if args.peers:
        from .evaluation.peers import peer_methods

        methods += peer_methods(args.budgets, num_steps=args.steps, guidance_scale=guidance,
                                sampler=None if args.model is None else sampler)
    chosen = select(methods, args.only)
    if args.only and not chosen:
        raise ConfigError(f"--only {' '.join(args.only)} matches no method; the labels are: "
                          + ", ".join(m.label for m in methods))
    methods = chosen
    if args.overwrite:
        runlog.clear(args.out)
    result = run_bench(model, sampler, methods, num_samples=args.samples, batch_size=args.batch_size,
                       num_classes=len(conditions), conditions=conditions, seed=args.seed, num_steps=args.steps,
                       guidance_scale=guidance, evaluator=evaluator, real_images=real, count_flops=not args.no_flops,
                       out_dir=args.out, resume=args.resume, extra_settings=extra,
                       command=getattr(args, "command_line", None))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    paths = result.save(args.out)
    print(result.to_markdown())
    if result.per_frame:
        print("\nper frame:\n" + result.per_frame_markdown())
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return 0


def analyze(args: argparse.Namespace) -> int:
    """The paper's Figures 1 and 2 (PNG plus CSV) from one traced full-computation generation."""
    from .evaluation.analyze import analyze_trace, record_trace, save_analysis

    if args.model:
        model, sampler = _pipeline_sampler(args.model)
    else:
        model, sampler, _, _ = _reference()
    count = len(find_adapter(model).cached_modules(model))  # checked before the trace, which is the long part
    bad = [j for j in args.modules or [] if j >= count]
    if bad:
        raise ConfigError(f"argument --modules: must be indices in 0..{count - 1} (the model has {count} cached "
                          f"modules), got {' '.join(map(str, bad))}")
    labels = torch.arange(args.samples) % 10
    run = partial(sampler, model, labels, num_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator().manual_seed(args.seed))
    trace = record_trace(model, run)
    result = analyze_trace(trace, interval=args.interval, order=args.order, modules=args.modules)
    for path in save_analysis(result, args.out):
        print(path)
    print(f"input/output prediction error correlation ({result.io_module}): {result.io_correlation:.3f}")
    return 0


def _add_generation_options(p: argparse.ArgumentParser, *, samples: int, samples_help: str, steps_help: str,
                            guidance: float | None = 1.5) -> None:
    """The options ``bench`` and ``analyze`` share: samples, DDIM steps, CFG scale, order and seed."""
    p.add_argument("--samples", type=_positive, default=samples, help=f"{samples_help} (default: %(default)s)")
    p.add_argument("--steps", type=_at_least_2, default=50, help=f"{steps_help} (default: %(default)s)")
    p.add_argument("--guidance", type=_guidance, default=guidance,
                   help="guidance scale, >= 0 (default: 1.5 on the reference model and DiT, else the pipeline's own)"
                   if guidance is None else "CFG scale, >= 0 (default: %(default)s)")
    p.add_argument("--order", type=int, default=2, choices=range(1, 5), help="Taylor/RFE order (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``relcache`` command."""
    parser = argparse.ArgumentParser(prog="relcache", description="Feature caching for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compare full computation, FORA, TaylorSeer and RFC on the shipped model",
                       description="Samples every digit class with full computation, FORA, TaylorSeer and RFC at "
                       "each budget (NFC of 50 DDIM steps) on the shipped reference DiT, writes a labelled PNG grid "
                       "and prints a table. Offline; about a minute on 2 CPU cores.")
    p.add_argument("--out", type=_output_png, default=DEMO_GRID,
                   help="path of the PNG grid, or a directory to write it in (default: %(default)s)")
    p.add_argument("--budgets", type=_budget, nargs="+", default=[14, 7],
                   help="NFC budgets of 50 steps, among 14 11 10 8 7 (default: 14 7)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--samples", type=_positive, default=20,
                   help="number of samples, classes cycling 0..9 (default: %(default)s)")
    p.set_defaults(func=demo, parser=p)

    p = sub.add_parser("bench", help="quality against compute for every method and budget",
                       description="Generates the same seeds with full computation and each method (FORA, "
                       "TaylorSeer, RFE alone, RCS alone, RFC; optionally diffusers' own caches) and writes "
                       "bench.csv, bench.json, bench.md, pareto.png and samples.png, each with the settings, "
                       "versions, date and command line. Every finished generation is recorded in results.jsonl as it "
                       "ends, so --resume continues an interrupted run. Runs on the shipped reference model or on a "
                       f"local pipeline directory of a supported family ({FAMILY_NAMES}). Shards seeds across "
                       "processes under torchrun.")
    p.add_argument("--model", type=_pipeline_dir,
                   help="a local diffusers pipeline directory (DiT, PixArt, SD3, FLUX, Wan, CogVideoX, HunyuanVideo, "
                   "Latte; default: the shipped reference model)")
    _add_generation_options(p, samples=100, samples_help="number of samples",
                            steps_help="denoising steps; with other than 50 each budget keeps the paper's interval, "
                            "and RFC aims at that interval's NFC over these steps", guidance=None)
    p.add_argument("--labels", type=_index, nargs="+",
                   help="class labels cycled over the samples, class-conditional models only (default: every class)")
    p.add_argument("--prompts", type=_prompts_file, metavar="FILE",
                   help="prompts cycled over the samples, one a line, text-conditioned models only (default: a "
                   f"built-in list of {len(DEFAULT_PROMPTS)} varied prompts)")
    p.add_argument("--frames", type=int, help="frames per video, video models only (default: the pipeline's own)")
    p.add_argument("--height", type=_size, help="image height in pixels (default: the pipeline's own)")
    p.add_argument("--width", type=_size, help="image width in pixels (default: the pipeline's own)")
    p.add_argument("--budgets", type=_budget, nargs="+", default=[14, 11, 10, 8, 7], help="NFC budgets of 50 steps")
    p.add_argument("--batch-size", type=_positive, default=10, help="samples per generation (default: %(default)s)")
    p.add_argument("--peers", action="store_true", help="add diffusers' own caches as peers")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass (faster)")
    p.add_argument("--only", nargs="+", help="run only methods whose label contains one of these strings")
    p.add_argument("--out", type=_output_dir, default="runs/bench", help="output directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out (refused if its settings differ)")
    p.add_argument("--overwrite", action="store_true", help="delete the run recorded in --out and start over")
    p.set_defaults(func=bench, parser=p)

    p = sub.add_parser("analyze", help="the RFC paper's Figures 1 and 2 as PNG and CSV",
                       description="Traces one full-computation generation and plots step-to-step distances of "
                       "module inputs and outputs, per-module prediction errors of FORA/TaylorSeer/RFE, the "
                       "stability of the ratio s, and the correlation of input and output prediction errors.")
    p.add_argument("--model", type=_dit_pipeline_dir,
                   help="a local diffusers DiTPipeline directory (default: the shipped model)")
    _add_generation_options(p, samples=10, samples_help="samples traced", steps_help="DDIM steps")
    p.add_argument("--interval", type=_positive, default=4, help="full step every N (default: %(default)s)")
    p.add_argument("--modules", type=_index, nargs="+", help="module indices for the distance plot")
    p.add_argument("--out", type=_output_dir, default="runs/analyze", help="output directory (default: %(default)s)")
    p.set_defaults(func=analyze, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relcache`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = command_line(None if argv is None else list(argv))
    try:
        return args.func(args)
    except ConfigError as err:  # a bad combination of options: the command's usage and the reason, not a traceback
        args.parser.error(str(err))
    except RankLostError as err:  # torchrun: another rank died; one line, not a traceback of the collective
        print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
