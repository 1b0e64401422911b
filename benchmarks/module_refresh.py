"""Issue 19 experiment: per-module refreshes at cached steps, against RFC at equal model FLOPs. Not a product feature.

RFC decides per step: all modules full, or all forecast. Here RFC runs with fewer full steps, and at a cached step a
module whose input moved more than ``tau`` since its latest record (relative, ``‖I - I(a)‖ / ‖I(a)‖``, the largest
over the batch) is computed and recorded instead of forecast; its later forecasts count ``k`` from that step (the
runtime keeps one latest record per module). The experiment wraps the runtime's per-module decision
(``ModuleCalls._forecast``) for the length of the run; it reads one host number per module and step, so it is for
quality only. The realised FLOPs fraction counts what ran. (Limit: the first cached module of a step, where RCS
takes the step's decision, is never refreshed, and its moves are not in the quantiles.)

    python benchmarks/module_refresh.py --runs 8:none 6:0.3 6:0.25 6:0.2 7:0.3 --samples 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from common import generate

import relcache
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import TRANSFORMER_DIR, load_evaluator
from relcache.methods.history import sample_norm
from relcache.runtime import modules
from relcache.runtime.context import RowGroup, ready


class Refresh:
    """Wraps ``ModuleCalls._forecast``: computes a ready module at a cached step when its input moved more than
    ``tau``; counts the refreshes and keeps every move it measured."""

    def __init__(self) -> None:
        self.tau: float | None = None
        self.moves: list[float] = []
        self.refreshes = 0
        self._original = modules.ModuleCalls._forecast

    def __enter__(self) -> Refresh:
        refresh, original = self, self._original

        def forecast(calls: Any, slot: modules.ModuleSlot, original_forward: Any, args: tuple, kwargs: dict) -> Any:
            ctx = calls.current
            if ctx is None or not ctx.schedule.decided or ctx.schedule.full:
                return original(calls, slot, original_forward, args, kwargs)
            spec = slot.spec
            inputs = spec.inputs(args, kwargs)
            shapes = tuple(tuple(x.shape) for x in inputs)
            groups = [RowGroup.of(name, rows, inputs, shapes)
                      for name, rows in ctx.cfg.row_groups(inputs[spec.probe].shape[0])]
            record = slot.record
            if all(ready(record, g.name, g.shapes) for g in groups):
                state = record.states[groups[0].name][0]
                if state.inp is not None:
                    x = groups[0].inputs[0]
                    before = state.input(x.dtype)
                    move = float((sample_norm(x - before) / sample_norm(before)).max())
                    refresh.moves.append(move)
                    if refresh.tau is not None and move > refresh.tau:
                        record.call_shapes = shapes
                        slot.computing = modules.Computing(ctx, shapes, groups)
                        refresh.refreshes += 1
                        return None  # computed; ``_record`` records it at this step
            return original(calls, slot, original_forward, args, kwargs)

        modules.ModuleCalls._forecast = forecast
        return self

    def __exit__(self, *exc: object) -> None:
        modules.ModuleCalls._forecast = self._original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TRANSFORMER_DIR), help="a DiTTransformer2DModel directory")
    parser.add_argument("--runs", nargs="+", default=["8:none", "6:0.25"],
                        help="NFC:tau pairs (tau 'none': RFC as it is)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/module_refresh.json")
    args = parser.parse_args()
    runs = []
    for run in args.runs:
        nfc, _, tau = run.partition(":")
        try:
            pair = (int(nfc), None if tau in ("", "none") else float(tau))
        except ValueError:
            pair = None
        if pair is None or pair[0] < 1 or pair[1] is not None and not pair[1] >= 0:
            parser.error(f"--runs takes NFC:tau pairs (NFC >= 1, tau >= 0 or 'none') such as 6:0.25 or 8:none, "
                         f"got {run!r}")
        runs.append(pair)
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    torch.set_num_threads(args.threads)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True,
                                                  low_cpu_mem_usage=False).eval()
    evaluator = load_evaluator()
    labels = torch.arange(args.samples) % 10
    full, _ = generate(model, labels, args.seed, None)
    rows = []
    print("| RFC target NFC | tau | FLOPs ratio | rel L1 | FID2FC | refreshes per generation | move q10 / q50 / q90 |")
    print("|---|---|---|---|---|---|---|")
    for nfc, tau in runs:
        with Refresh() as refresh:
            refresh.tau = tau
            out, stats = generate(model, labels, args.seed, relcache.RFC(order=2, target_nfc=nfc))
        moves = sorted(refresh.moves)
        q = [moves[int(p * (len(moves) - 1))] for p in (0.1, 0.5, 0.9)] if moves else []
        rows.append({"nfc": nfc, "tau": tau, "flops_ratio": sum(s.model_flops_fraction for s in stats) / len(stats),
                     "rel_l1": relative_l1(out, full), "fid2fc": digits_fid(evaluator, out, full),
                     "refreshes_per_generation": refresh.refreshes / len(stats), "move_quantiles": q})
        r = rows[-1]
        print(f"| {nfc} | {tau if tau is not None else '-'} | {r['flops_ratio']:.3f} | {r['rel_l1']:.4f} | "
              f"{r['fid2fc']:.3f} | {r['refreshes_per_generation']:.1f} | {' / '.join(f'{v:.3f}' for v in q)} |",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "model": args.model, "samples": args.samples, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
