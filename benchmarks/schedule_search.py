"""Issue 19: how much of RFC's error at low budgets is where its full steps fall? Fixed full-step sets against RCS.

Two experiments on a reference model, in batches of 10 samples (digits 0-9; batch ``b`` seeded ``b``, as in
``plus.py``), each full-step set run with RFC's predictor (``Relational``) or RFC+'s (``--predictor plus``) and
``relcache.Steps``, which computes exactly the listed steps (``--predictor fit-scaled``: the ``InputFit``
experiment, rescaled to RFE's length, as ``plus.py``'s "Fit-scaled x RCS"):

* ``--warps``: steps 0 and 1, then ``1 + round((end - 1) (j / (K - 2))^gamma)`` for ``j = 1 .. K - 2`` (gamma < 1
  puts more full steps late, > 1 early; ``end`` is the last full step), on the calibration batches
  (``--calibrate-seeds``), against RFC at the same ``K`` on them;
* ``--search``: a schedule calibrated on some seeds and used on others. RCS's own full steps on the calibration
  batches (seeded ``--calibrate-seeds``, none of them a test seed) as a start, then ``search_steps``'s coordinate
  descent (each step after the warm-up moved by up to ``--radius``, kept while the calibration samples' rel L1
  falls, with the chosen predictor; ``--starts`` runs one search from each start it names, RCS's steps or warped
  spacings, and keeps the lowest calibration error); the steps found are then run on the test samples,
  ``plus.py``'s 30 (batches seeded 0, 1, 2), against RFC on the same samples: rel L1 and FID2FC over all of them,
  as in docs/results.md.

    python benchmarks/schedule_search.py --warps --budgets 10 8 7
    python benchmarks/schedule_search.py --search --budgets 14 11 10 8 7 --predictor plus
    python benchmarks/schedule_search.py --evaluate found.json --budgets 10 8 7 --predictor fit-scaled

``--evaluate`` reruns steps found earlier (the ``summary`` of a ``--search``'s ``--out``) on the test samples only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import relcache
from relcache import CacheConfig, Relational, Steps
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import TRANSFORMER_DIR, load_evaluator, sample_digits
from relcache.evaluation.steps_search import search_steps
from relcache.methods.fit import InputFit
from relcache.methods.plus import RelationalPlus

STEPS = 50  # the reference sampler's steps
PREDICTORS = {"rfe": lambda: Relational(2), "plus": lambda: RelationalPlus(2),
              "fit-scaled": lambda: InputFit(2, scale=True)}  # fit-scaled: RFCPlus(fit=True)'s predictor


def warp(nfc: int, gamma: float, end: int) -> tuple[int, ...]:
    """Steps 0 and 1, then ``nfc - 2`` steps on ``1 + (end - 1) x^gamma``; collisions filled at the largest gap."""
    steps = {0, 1} | {1 + round((end - 1) * (j / (nfc - 2)) ** gamma) for j in range(1, nfc - 1)}
    out = sorted(steps)
    while len(out) < nfc:
        _, a, b = max((b - a, a, b) for a, b in zip(out, out[1:], strict=False))
        out = sorted([*out, (a + b) // 2])
    return tuple(out)


def _generate(model: torch.nn.Module, seed: int, config: CacheConfig | None,
              ) -> tuple[torch.Tensor, relcache.CacheStats | None]:
    """One batch of 10 samples (digits 0-9) seeded ``seed``, with ``config`` (None: full computation)."""
    labels = torch.arange(10) % 10
    if config is not None:
        relcache.enable(model, config)
    try:
        out = sample_digits(model, labels, generator=torch.Generator().manual_seed(seed))
        return out, (relcache.stats(model) if config is not None else None)
    finally:
        if config is not None:
            relcache.disable(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TRANSFORMER_DIR), help="a DiTTransformer2DModel directory")
    parser.add_argument("--budgets", nargs="+", type=int, default=[10, 8, 7])
    parser.add_argument("--predictor", choices=list(PREDICTORS), default="rfe",
                        help="rfe: RFC's; plus: RFC+'s; fit-scaled: the InputFit experiment, scaled to RFE's length")
    parser.add_argument("--warps", action="store_true", help="fixed warped spacings on the calibration batches")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.55, 0.7, 0.85, 1.0, 1.3, 1.6])
    parser.add_argument("--ends", nargs="+", type=int, default=[45, 47, 48, 49])
    parser.add_argument("--search", action="store_true",
                        help="coordinate search from RCS's steps on the calibration batches")
    parser.add_argument("--evaluate", nargs="+", metavar="JSON",
                        help="no search: the steps an earlier --search found (its --out files), run with --predictor "
                             "on the test samples against RFC, for the --budgets found there")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibrate-seeds", type=int, nargs="+", default=[100],
                        help="the calibration batches' seeds (10 samples each)")
    parser.add_argument("--radius", type=int, default=3, help="the search's largest move of one step")
    parser.add_argument("--starts", nargs="+", default=["rcs"],
                        help="where searches start: 'rcs' (RCS's steps) or GAMMA:END (a warped spacing); the "
                             "lowest calibration error over all of them wins")
    parser.add_argument("--test", type=int, default=3, help="test batches after the search (seeds 0 .. TEST-1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON of every run")
    args = parser.parse_args()
    for nfc in args.budgets:
        if not 3 <= nfc <= STEPS:
            parser.error(f"--budgets: each must be an integer in 3..{STEPS}, got {nfc}")
    starts = []
    for spec in args.starts:
        try:
            starts.append(None if spec == "rcs" else (float(spec.split(":")[0]), int(spec.split(":")[1])))
        except (ValueError, IndexError):
            parser.error(f"--starts: each must be 'rcs' or GAMMA:END (e.g. 0.85:47), got {spec!r}")
    if not (args.warps or args.search or args.evaluate):
        parser.error("give --warps, --search (or both), or --evaluate")
    if args.evaluate and (args.warps or args.search):
        parser.error("--evaluate runs steps found earlier: give it without --warps and --search")
    found_steps: dict[int, list[int]] = {}
    for path in args.evaluate or []:
        try:
            found_steps.update({r["nfc"]: r["steps"] for r in json.loads(Path(path).read_text())["summary"]})
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(f"--evaluate: cannot read the steps in {path}: {err}")
    missing = [n for n in args.budgets if args.evaluate and n not in found_steps]
    if missing:
        parser.error(f"--evaluate: no steps for --budgets {missing} in {args.evaluate}")
    if args.test < 1 or any(s in range(args.test) for s in args.calibrate_seeds):
        parser.error(f"--test must be >= 1 and --calibrate-seeds outside 0..TEST-1, got {args.test}, "
                     f"{args.calibrate_seeds}")
    torch.set_num_threads(args.threads)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True,
                                                  low_cpu_mem_usage=False).eval()
    evaluator = load_evaluator()
    cals = [] if args.evaluate else args.calibrate_seeds
    tests = list(range(args.test)) if args.search or args.evaluate else []
    full = {b: _generate(model, b, None)[0] for b in [*cals, *tests]}
    make = PREDICTORS[args.predictor]
    runs, t0 = [], time.time()

    def run(kind: str, nfc: int, seed: int, config: CacheConfig, steps: tuple[int, ...] | None = None,
            ) -> tuple[float, torch.Tensor]:
        out, stats = _generate(model, seed, config)
        err = relative_l1(out, full[seed])
        runs.append({"kind": kind, "nfc": nfc, "seed": seed, "steps": list(steps or stats.full_steps),
                     "realised_nfc": stats.nfc, "rel_l1": err})
        return err, out

    def fixed(nfc: int, steps: tuple[int, ...], seed: int, kind: str = "fixed") -> tuple[float, torch.Tensor]:
        return run(kind, nfc, seed, CacheConfig(make(), Steps(steps)), steps)

    def calibration_error(nfc: int, steps: tuple[int, ...], kind: str) -> float:
        """rel L1 over every calibration sample (each batch's is the mean over its samples)."""
        return sum(fixed(nfc, steps, seed, kind)[0] for seed in cals) / len(cals)

    def over_tests(outs: list[torch.Tensor]) -> tuple[float, float]:
        """rel L1 and FID2FC over every test sample (``plus.py``'s measure)."""
        got, ref = torch.cat(outs), torch.cat([full[b] for b in tests])
        return relative_l1(got, ref), digits_fid(evaluator, got, ref)

    summary = []

    def on_tests(nfc: int, best: list[int], kind: str) -> None:
        """RFC and the steps ``best`` on the test samples: printed, and a row of the summary."""
        rfc_outs = [run("RFC, test", nfc, b, relcache.RFC(target_nfc=nfc))[1] for b in tests]
        rfc_steps = [r["steps"] for r in runs[-len(tests):]]
        found = [fixed(nfc, tuple(best), b, kind)[1] for b in tests]
        (e_rfc, f_rfc), (e_found, f_found) = over_tests(rfc_outs), over_tests(found)
        summary.append({"nfc": nfc, "steps": best, "rfc_steps": rfc_steps, "rfc": [e_rfc, f_rfc],
                        "searched": [e_found, f_found]})
        print(f"  test samples: RFC {e_rfc:.4f} / {f_rfc:.3f} (steps {rfc_steps}); steps {best} with "
              f"{args.predictor} {e_found:.4f} / {f_found:.3f} ({e_found / e_rfc:.2f}x)", flush=True)

    for nfc in args.budgets:
        if args.evaluate:
            print(f"NFC {nfc}:", flush=True)
            on_tests(nfc, found_steps[nfc], "evaluated, test")
            continue
        rfc_cal = sum(run("RFC", nfc, seed, relcache.RFC(target_nfc=nfc))[0] for seed in cals) / len(cals)
        start = tuple(runs[-len(cals)]["steps"])  # RCS's steps on the first calibration batch
        print(f"NFC {nfc}: RFC on the calibration batch, rel L1 {rfc_cal:.4f}, full steps {list(start)}", flush=True)
        if args.warps:
            for gamma in args.gammas:
                for end in args.ends:
                    steps = warp(nfc, gamma, end)
                    e = calibration_error(nfc, steps, "warp")
                    print(f"  gamma {gamma} end {end}: {e:.4f} ({e / rfc_cal:.2f}x RFC) {list(steps)}", flush=True)
        if args.search:
            best, best_err = None, float("inf")
            for origin in starts:
                first = start if origin is None else warp(nfc, *origin)
                found_steps, err, evaluated = search_steps(
                    lambda st, n=nfc: calibration_error(n, st.steps, "search"), first, STEPS, radius=args.radius,
                    rounds=args.rounds, progress=False)
                label = "RCS's steps" if origin is None else f"warp {origin[0]}:{origin[1]} {list(first)}"
                print(f"  searched from {label} ({evaluated} sets on the calibration samples): {err:.4f} "
                      f"({err / rfc_cal:.2f}x) {list(found_steps.steps)}  ({time.time() - t0:.0f} s)", flush=True)
                if err < best_err:
                    best, best_err = list(found_steps.steps), err
            on_tests(nfc, best, "searched, test")
    if summary:
        print(f"\n| NFC | RFC rel L1 / FID2FC | searched steps, {args.predictor} | x RFC | steps |")
        print("|---|---|---|---|---|")
        for r in summary:
            print(f"| {r['nfc']} | {r['rfc'][0]:.4f} / {r['rfc'][1]:.3f} | {r['searched'][0]:.4f} / "
                  f"{r['searched'][1]:.3f} | {r['searched'][0] / r['rfc'][0]:.2f} | {r['steps']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
            "predictor": args.predictor, "calibrate_seeds": cals, "radius": args.radius,
            "evaluated_from": args.evaluate, "summary": summary,
            "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
