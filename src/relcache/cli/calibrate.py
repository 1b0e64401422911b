"""``relcache calibrate``: which steps to compute fully at a budget, calibrated for one model and sampler
(``relcache.evaluation.steps_search.calibrate_steps``), on the reference model or a local pipeline directory. Each
budget's result is written to ``calibration.json`` as it finishes, so ``--resume`` continues an interrupted run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .options import (
    _add_condition_options,
    _add_generation_options,
    _check_resume,
    _index,
    _integer,
    _output_dir,
    _pipeline_dir,
    _pipeline_guidance,
    _pipeline_inputs,
    _positive,
)
from .reference import _reference

RESULT = "calibration.json"
#: the predictors a calibration can be made for, and the preset that uses its steps (with ``num_steps``, so that a
#: generation of another length is refused rather than run with steps chosen for this one)
PREDICTORS = {"fit": "relcache.RFCPlus(order={order}, full_steps=relcache.Steps({steps}, num_steps={num_steps}), "
                     "fit=True)",
              "plus": "relcache.RFCPlus(order={order}, full_steps=relcache.Steps({steps}, num_steps={num_steps}))",
              "rfe": "relcache.CacheConfig(relcache.Relational({order}), "
                     "relcache.Steps({steps}, num_steps={num_steps}))"}


def _predictor(name: str, order: int) -> Any:
    """The predictor of the configuration ``PREDICTORS[name]`` names."""
    from ..methods.config import RFCPlus
    from ..methods.predictors import Relational

    if name == "rfe":
        return Relational(order)
    return RFCPlus(order, full_steps=[0], fit=name == "fit").predictor


def _settings(args: argparse.Namespace, conditions: list[int], extra: dict[str, Any],
              guidance: float | None) -> dict[str, Any]:
    """What a resumed run must share with the recorded one."""
    return {"samples": args.samples, "steps": args.steps, "guidance": guidance, "order": args.order,
            "seed": args.seed, "predictor": args.predictor, "radius": args.radius, "rounds": args.rounds,
            "conditions": conditions, **extra}


def _start(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """The record to add to: the earlier run's with ``--resume`` (refused if its settings differ), else a new one."""
    path = args.out / RESULT
    if path.exists() and not (args.resume or args.overwrite):
        raise ConfigError(f"--out {args.out} holds an earlier calibration ({path}): pass --resume to continue it, "
                          "--overwrite to start over, or another --out")
    if args.resume and not path.exists():  # found by review: a mistyped --out started over without a word
        print(f"note: --resume: {args.out} holds no calibration to continue; starting a new one", file=sys.stderr)
    if args.resume and path.exists():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"--resume: {path} cannot be read ({err}): pass --overwrite to start over, or another "
                              "--out") from None
        entry_keys = {"steps", "rel_l1", "rfc_rel_l1", "evaluated", "use"}
        if (not isinstance(record, dict) or not isinstance(record.get("budgets"), dict)
                or not all(isinstance(e, dict) and entry_keys <= set(e) for e in record["budgets"].values())):
            raise ConfigError(f"--resume: {path} is not a calibration record (a 'budgets' mapping of entries with "
                              f"{', '.join(sorted(entry_keys))}): pass --overwrite to start over, or another --out")
        if record.get("settings") != settings:
            old = record.get("settings") or {}
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"--resume: the run in {args.out} was made with other settings ({', '.join(diff)})")
        from ..methods.schedules import Steps

        for nfc, entry in record["budgets"].items():  # found by review: an edited entry was printed as usable
            steps = entry["steps"]
            try:  # the schedule's own check: step indices from 0, increasing, below the length
                fits = isinstance(steps, list) and len(Steps(steps, num_steps=args.steps).steps) == int(nfc)
            except (ConfigError, ValueError):
                fits = False
            if not fits:
                raise ConfigError(f"--resume: {path} holds for NFC {nfc} the steps {steps!r}, not {nfc} increasing "
                                  f"steps from 0 below --steps {args.steps}: pass --overwrite to start over, or "
                                  "another --out")
        return record
    if args.overwrite and path.exists():
        path.unlink()  # as asked: the earlier calibration is gone, whatever happens next
    return {"command": getattr(args, "command_line", None), "settings": settings, "budgets": {}}


def _check(args: argparse.Namespace) -> None:
    """The options whose range depends on another one, or that rule each other out, checked before torch is
    imported (``cli.main``)."""
    if args.steps < 4:
        raise ConfigError(f"argument --steps: must be at least 4 for calibrate (3 full steps and one to cache), got "
                          f"{args.steps}")
    bad = [n for n in args.nfc if not 3 <= n < args.steps]
    if bad:
        raise ConfigError(f"argument --nfc: each must be an integer in 3..{args.steps - 1} (below --steps: at "
                          f"--steps every step is full, with nothing to calibrate), got {' '.join(map(str, bad))}")
    _check_resume(args)


def run(args: argparse.Namespace) -> int:
    """Calibrate each ``--nfc`` budget in turn; print and record the steps and their errors."""
    import torch

    from ..evaluation.runlog import whole
    from ..evaluation.steps_search import calibrate_steps

    family, conditions, extra = _pipeline_inputs(args)
    guidance = _pipeline_guidance(args, family)
    settings = _settings(args, conditions, extra, guidance)
    record = _start(args, settings)
    if args.model:
        from ..evaluation.pipelines import load_sampler

        model, sampler = load_sampler(args.model, family, prompts=args.prompts.prompts if args.prompts else None,
                                      frames=args.frames, height=args.height, width=args.width)
    else:
        model, sampler, _, _ = _reference()
    labels = torch.tensor([conditions[i % len(conditions)] for i in range(args.samples)])
    kwargs: dict[str, Any] = {"num_steps": args.steps}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance

    def generate() -> torch.Tensor:
        return sampler(model, labels, generator=torch.Generator().manual_seed(args.seed), **kwargs)

    args.out.mkdir(parents=True, exist_ok=True)
    template = PREDICTORS[args.predictor]
    for nfc in args.nfc:
        done = record["budgets"].get(str(nfc))
        recorded = done is not None  # calibrated by an earlier run (--resume): nothing runs for it now
        if not recorded:
            found = calibrate_steps(model, generate, nfc, args.steps, _predictor(args.predictor, args.order),
                                    radius=args.radius, rounds=args.rounds)
            steps = list(found.steps.steps)
            done = {"steps": steps, "rel_l1": found.error, "start_rel_l1": found.start_error,
                    "rfc_steps": list(found.rfc_steps), "rfc_rel_l1": found.rfc_error, "evaluated": found.evaluated,
                    "use": template.format(order=args.order, steps=steps, num_steps=args.steps),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            record["budgets"][str(nfc)] = done
            with whole(args.out / RESULT) as tmp:  # whole or not at all, should the run stop here
                tmp.write_text(json.dumps(record, indent=2))
        # against RFC's error; RFC exact (0, nothing cached in effect) has no ratio to give (it printed "nanx")
        ratio = f"{done['rel_l1'] / done['rfc_rel_l1']:.2f}x" if done["rfc_rel_l1"] > 0 else "against"
        print(f"NFC {nfc}: rel L1 {done['rel_l1']:.4g} on the calibration batch ({ratio} RFC's "
              f"{done['rfc_rel_l1']:.4g}; {done['evaluated'] + 2} generations: the search's {done['evaluated']}, full "
              f"computation's and RFC's{', recorded before' if recorded else ''})\n  "
              f"{template.format(order=args.order, steps=done['steps'], num_steps=args.steps)}", flush=True)
    print(f"written: {Path(args.out) / RESULT}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``calibrate``'s options, as a subcommand of ``sub``."""
    p = sub.add_parser("calibrate", help="the full steps to compute at a budget, calibrated for one model",
                       description="Searches, per budget, which steps to compute fully for one model, sampler and "
                       "step count: it starts from the steps RFC chooses on a calibration batch and moves each by "
                       "up to --radius while the batch's rel L1 against full computation falls (docs/spec.md, "
                       "'Calibrated full steps'). Prints the configuration to use, e.g. relcache.RFCPlus(full_steps="
                       "relcache.Steps([...], num_steps=N)), and writes calibration.json after each budget "
                       "(--resume continues). Calibrate on "
                       "other seeds than you evaluate on.")
    p.add_argument("--model", type=_pipeline_dir,
                   help="a local diffusers pipeline directory of a supported family (default: the shipped reference "
                   "model)")
    p.add_argument("--nfc", type=_integer, nargs="+", required=True,
                   help="budgets: full steps per generation, each in 3..--steps minus 1")
    _add_generation_options(p, samples=10, samples_help="samples in the calibration batch",
                            steps_help="denoising steps the steps are calibrated for", guidance=None)
    p.set_defaults(seed=100, peers=False, check=_check)
    p.add_argument("--predictor", choices=list(PREDICTORS), default="fit",
                   help="fit: RFCPlus(fit=True)'s, the input-fitted increment; plus: RFCPlus's default; rfe: RFC's "
                   "(default: %(default)s)")
    p.add_argument("--radius", type=_positive, default=3, help="largest move of one step (default: %(default)s)")
    p.add_argument("--rounds", type=_index, default=3, help="rounds of moves at most (default: %(default)s)")
    _add_condition_options(p)
    p.add_argument("--out", type=_output_dir, default="runs/calibrate", help="output directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the calibration recorded in --out")
    p.add_argument("--overwrite", action="store_true", help="delete the calibration in --out and start over")
    p.set_defaults(func=run, parser=p)
