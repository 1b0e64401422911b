"""``relcache analyze``: the RFC paper's Figures 1 and 2 from one traced full-computation generation, on the reference
model or a local ``DiTPipeline`` directory."""

from __future__ import annotations

import argparse
from functools import partial
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .options import _add_generation_options, _dit_pipeline_dir, _index, _output_dir, _positive
from .reference import _reference

if TYPE_CHECKING:
    import torch

    from ..evaluation.bench import Sampler


def _pipeline_sampler(path: str) -> tuple[torch.nn.Module, Sampler]:
    """(transformer, sampler) of a local DiTPipeline directory (``analyze``); samples are mapped to [-1, 1]."""
    import torch
    from diffusers import DiTPipeline

    from ..api import begin_generation

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


def _meta_transformer(path: str) -> torch.nn.Module:
    """The transformer of the DiTPipeline in ``path``, built from its config on the meta device: no weights are read."""
    import torch
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        return DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(path, subfolder="transformer"))


def _check_modules(modules: list[int] | None, model: torch.nn.Module) -> None:
    """A ConfigError naming ``--modules`` when an index is past ``model``'s cached modules."""
    from ..models.base import find_adapter

    count = len(find_adapter(model).cached_modules(model))
    bad = [j for j in modules or [] if j >= count]
    if bad:
        raise ConfigError(f"argument --modules: must be indices in 0..{count - 1} (the model has {count} cached "
                          f"modules), got {' '.join(map(str, bad))}")


def _trace_limit() -> tuple[int, int] | None:
    """(bytes the trace may take, bytes available), None where the available memory is unknown."""
    from ..evaluation.analyze import MEMORY_SHARE, available_memory

    free = available_memory()
    return (int(MEMORY_SHARE * free), free) if free is not None else None


def _too_large(need: int, limit: tuple[int, int], args: argparse.Namespace) -> str:
    """Why a trace of ``need`` bytes is refused, and the --samples and --steps that would fit."""
    from ..evaluation.analyze import MEMORY_SHARE, gib

    per_sample = need / args.samples
    fit = int(limit[0] // per_sample)
    steps = int(limit[0] // (per_sample / args.steps))
    hint = (f"--samples {fit} or fewer fit at --steps {args.steps}" if fit >= 1 else
            f"even --samples 1 needs {gib(per_sample)}; at most --steps {steps} fit with --samples 1" if steps >= 2
            else f"even --samples 1 --steps 2 needs {gib(2 * per_sample / args.steps)}")
    return (f"--samples {args.samples} --steps {args.steps}: the trace (every cached module's input and output at "
            f"every step, float32) would take {gib(need)} of memory, over the {gib(limit[0])} it may take "
            f"({MEMORY_SHARE:.0%} of the {gib(limit[1])} available): lower --samples or --steps ({hint})")


def _check_trace_size(model: torch.nn.Module, args: argparse.Namespace, limit: tuple[int, int] | None) -> int | None:
    """The trace's bytes, estimated on the meta device from ``model``'s config (None where that fails: then
    ``record_trace`` checks after the first step); a ConfigError naming --samples and --steps where they exceed
    ``limit``."""
    from ..evaluation.analyze import trace_bytes

    rows = args.samples * (2 if args.guidance > 1 else 1)  # the DiT samplers double the batch for guidance
    try:
        need = trace_bytes(model, rows, args.steps)
    except Exception:  # noqa: BLE001 - a model the meta run does not take: the check after the first step is left
        return None
    if limit is not None and need > limit[0]:
        raise ConfigError(_too_large(need, limit, args))
    return need


def _run_record(args: argparse.Namespace, trace: int | None) -> dict:
    """What ``analyze`` ran: command, date, settings (everything the figures depend on), versions, machine."""
    from ..evaluation import provenance
    from ..evaluation.analyze import gib

    settings = {"model": args.model or "shipped reference model", "samples": args.samples, "steps": args.steps,
                "interval": args.interval, "order": args.order, "guidance": args.guidance, "seed": args.seed,
                "modules": args.modules if args.modules is not None else "default"}
    if trace is not None:
        settings["trace"] = gib(trace)
    return {"command": getattr(args, "command_line", None), "date": provenance.now(), "settings": settings,
            "versions": provenance.versions(), "machine": provenance.machine()}


def run(args: argparse.Namespace) -> int:
    """The paper's Figures 1 and 2 (PNG plus CSV) from one traced full-computation generation."""
    import torch

    from ..evaluation.analyze import TraceTooLarge, analyze_trace, record_trace, save_analysis, schedule_problem

    problem = schedule_problem(args.interval, args.steps)
    if problem is not None:
        raise ConfigError(f"argument --interval: {problem}")
    # the trace is held in memory: a size the machine cannot hold is refused before the long part (found by review:
    # DiT-XL-2-256 at the defaults needs 123 GiB, and was killed for memory after a long run with nothing saved)
    limit = _trace_limit()
    if args.model:
        meta = _meta_transformer(args.model)
        _check_modules(args.modules, meta)  # before the pipeline loads
        need = _check_trace_size(meta, args, limit)
        model, sampler = _pipeline_sampler(args.model)
    else:
        model, sampler, _, _ = _reference()
        _check_modules(args.modules, model)  # before the trace, which is the long part
        need = _check_trace_size(model, args, limit)
    # classes cycle within the model's own (a DiT's num_embeds_ada_norm; the shipped model's 10 digits): a DiT of
    # fewer than 10 classes was given labels past its last, or its null class (found by review)
    classes = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None) if args.model else None
    labels = torch.arange(args.samples) % min(10, classes or 10)
    generate = partial(sampler, model, labels, num_steps=args.steps, guidance_scale=args.guidance,
                       generator=torch.Generator().manual_seed(args.seed))
    try:
        trace = record_trace(model, generate, progress=True, num_steps=args.steps,
                             max_bytes=limit[0] if limit is not None else None)
    except TraceTooLarge as err:  # the estimate could not be made beforehand: stopped after the first step
        raise ConfigError(_too_large(err.estimate, limit, args)) from None
    result = analyze_trace(trace, interval=args.interval, order=args.order, modules=args.modules)
    for path in save_analysis(result, args.out, run=_run_record(args, need)):
        print(path)
    print(f"input/output prediction error correlation ({result.io_module}): {result.io_correlation:.3f}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``analyze``'s options, as a subcommand of ``sub``."""
    p = sub.add_parser("analyze", help="the RFC paper's Figures 1 and 2 as PNG and CSV",
                       description="Traces one full-computation generation and plots step-to-step distances of "
                       "module inputs and outputs, per-module prediction errors of FORA/TaylorSeer/RFE, the "
                       "stability of the ratio s, and the correlation of input and output prediction errors.")
    p.add_argument("--model", type=_dit_pipeline_dir,
                   help="a local diffusers DiTPipeline directory (default: the shipped model)")
    _add_generation_options(p, samples=10, samples_help="samples traced", steps_help="DDIM steps")
    p.add_argument("--interval", type=_positive, default=4, help="full step every N (default: %(default)s)")
    p.add_argument("--modules", type=_index, nargs="+",
                   help="module indices for the distance plot (default: the first, middle and last cached module)")
    p.add_argument("--out", type=_output_dir, default="runs/analyze", help="output directory (default: %(default)s)")
    p.set_defaults(func=run, parser=p)
