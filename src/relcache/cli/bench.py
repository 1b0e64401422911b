"""``relcache bench``: the evaluation table and pictures, methods x budgets against full computation, on the
reference model or a local pipeline directory; its option combinations checked before anything is loaded."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..evaluation.budgets import DEFAULT_BUDGETS, INTERVAL_FOR_NFC
from ..evaluation.pipelines import FAMILY_NAMES
from .options import (
    _add_condition_options,
    _add_generation_options,
    _budget,
    _check_resume,
    _output_dir,
    _pipeline_dir,
    _pipeline_guidance,
    _pipeline_inputs,
    _positive,
)
from .reference import _reference

if TYPE_CHECKING:
    from ..evaluation.bench import BenchMethod, Sampler


def _methods(args: argparse.Namespace, guidance: float | None, sampler: Sampler | None) -> list[BenchMethod]:
    """The methods ``--only`` picks (relcache's, and with ``--peers`` diffusers' and cache-dit's); a ConfigError
    listing the labels when one of its substrings matches none. ``sampler``: the pipeline's, which MagCache
    calibrates with (None: the reference model's)."""
    from ..evaluation.bench import default_methods, select

    methods = default_methods(args.budgets, order=args.order, num_steps=args.steps)
    if args.peers:
        from ..evaluation.peers import peer_methods

        methods += peer_methods(args.budgets, num_steps=args.steps, guidance_scale=guidance, sampler=sampler,
                                batch_size=min(args.batch_size, args.samples), reference_model=args.model is None)
    unmatched = [o for o in args.only or () if not select(methods, [o])]
    if unmatched:  # one that matches nothing beside others that do would be dropped silently
        raise ConfigError(f"--only {' '.join(map(repr, unmatched))} matches no method; the labels are: "
                          + ", ".join(m.label for m in methods))
    return select(methods, args.only)


def _check(args: argparse.Namespace) -> None:
    """The options that rule each other out, checked before torch is imported (``cli.main``)."""
    if args.peers and args.steps != 50:
        raise ConfigError(f"--peers needs --steps 50 (the peers' thresholds are calibrated for 50 steps), "
                          f"got --steps {args.steps}")
    _check_resume(args)


def run(args: argparse.Namespace) -> int:
    """The evaluation table and pictures: methods x budgets against full computation, on the reference model or a
    local pipeline of a supported family. Every finished generation is recorded as it ends (``--resume``)."""
    import torch

    from ..evaluation import provenance, runlog
    from ..evaluation.bench import bench_settings, repeated_budgets, run_bench

    family, conditions, extra = _pipeline_inputs(args)
    guidance = _pipeline_guidance(args, family)
    _methods(args, guidance, None)  # --only checked before the model loads (the labels need no model)
    for budget, nfc, earlier in repeated_budgets(args.budgets, args.steps):
        print(f"note: --budgets {budget} adds no rows: " + ("it is given twice" if budget == earlier else
              f"over {args.steps} steps its interval gives NFC {nfc}, as budget {earlier}'s does"), file=sys.stderr)
    if args.peers:
        from ..evaluation.peers.rows import calibration_differences

        differ = calibration_differences(reference_model=args.model is None, num_steps=args.steps,
                                         guidance_scale=guidance, batch_size=min(args.batch_size, args.samples))
        if differ:  # their rows stay in the table, unavailable, saying why (peer_methods)
            print("note: diffusers' FBCache and MagCache and cache-dit's DBCache are left out (their rows say so): "
                  "their thresholds, which set each row's NFC, were calibrated on the shipped reference model for 50 "
                  f"steps, guidance 1.5 and batches of 10, not for {', '.join(differ)}, where they realize other "
                  "NFCs. To compare them, calibrate thresholds for your model and settings with "
                  "relcache.evaluation.peers.calibrate_thresholds and run them with "
                  "relcache.evaluation.bench.run_bench. TaylorSeer (a fixed step schedule) and FasterCache run.",
                  file=sys.stderr)
    if runlog.has_log(args.out) and not (args.resume or args.overwrite):
        try:
            header = runlog.read_header(args.out) or {}
        except runlog.ResumeError:  # found by review: "cannot resume" (not asked for) and no way on
            raise ConfigError(f"--out {args.out} holds a {runlog.LOG} that is no readable run record (empty or "
                              "damaged): pass --overwrite to delete it and start over, or another --out") from None
        raise ConfigError(f"--out {args.out} holds an earlier run (started {header.get('date')}, command: "
                          f"{header.get('command')}): pass --resume to continue it, --overwrite to start over, or "
                          "another --out")
    if args.resume and not runlog.has_log(args.out):  # found by review: a mistyped --out started over without a word
        print(f"note: --resume: {args.out} holds no run to continue; starting a new one", file=sys.stderr)
    if args.resume:  # the settings known before loading anything (run_bench compares the methods too)
        runlog.check_resumable(args.out, bench_settings(
            num_samples=args.samples, batch_size=args.batch_size, num_classes=len(conditions), seed=args.seed,
            num_steps=args.steps, guidance_scale=guidance, count_flops=not args.no_flops, conditions=conditions,
            extra=extra), provenance.versions())
        runlog.check_log(args.out)  # every line of the log (found by review: tracebacks after the model loaded)
    if args.model:
        from ..evaluation.pipelines import load_sampler

        model, sampler = load_sampler(args.model, family, prompts=args.prompts.prompts if args.prompts else None,
                                      frames=args.frames, height=args.height, width=args.width)
        evaluator = real = None
    else:
        model, sampler, evaluator, real = _reference()
    methods = _methods(args, guidance, None if args.model is None else sampler)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``bench``'s options, as a subcommand of ``sub``."""
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
    _add_condition_options(p)
    p.add_argument("--budgets", type=_budget, nargs="+", default=list(DEFAULT_BUDGETS),
                   help=f"NFC budgets of 50 steps, of {sorted(INTERVAL_FOR_NFC)} (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=10, help="samples per generation (default: %(default)s)")
    p.add_argument("--peers", action="store_true",
                   help="add diffusers' own caches as peers, and cache-dit's where it is installed (the reference "
                        "model and DiT pipelines only; needs --steps 50). The threshold-based ones (FBCache, MagCache, "
                        "DBCache) run only on the reference model with --guidance 1.5 and --batch-size 10, which their "
                        "thresholds were calibrated for; elsewhere their rows say so")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass (faster)")
    p.add_argument("--only", nargs="+", help="run only methods whose label contains one of these strings")
    p.add_argument("--out", type=_output_dir, default="runs/bench", help="output directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out (refused if its settings differ)")
    p.add_argument("--overwrite", action="store_true", help="delete the run recorded in --out and start over")
    p.set_defaults(func=run, parser=p, check=_check)
