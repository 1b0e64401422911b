"""Issue 19 (RFC+): the Newton-form forecast and the forecast ratio against RFC, on a reference model.

End to end: every method at target NFC K (the paper's budgets) on the same seeds as full computation; rel L1 and
digits-FID2FC of the final samples, realised NFC and model FLOPs fraction (equal FLOPs: same NFC, same model).
Teacher-forced (``--teacher``): one full-computation trace of the first batch; each predictor replayed on it per
module (``relcache.evaluation.analyze.replay``) with the full steps RFC realised on that batch at each budget
(uneven gaps), mean relative L1 over cached steps and modules. The "Fit" rows are the input-fitted increment
(``relcache.methods.plus.InputFit``, an experiment).

    python benchmarks/plus.py --budgets 14 11 10 8 7 --samples 30 --teacher --out runs/plus.json
    python benchmarks/plus.py --model src/relcache/evaluation/reference/weights/second_seed1_shift1/transformer ...
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import generate, reference_parser

import relcache
from relcache import CacheConfig, InputError, Relational
from relcache.evaluation.analyze import record_trace, replay
from relcache.evaluation.digits import digits_fid
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import TRANSFORMER_DIR, load_evaluator, sample_digits
from relcache.methods.fit import InputFit
from relcache.methods.plus import Newton, NewtonInputError, RelationalPlus
from relcache.methods.predictors import Taylor


def methods(nfc: int, order: int) -> dict[str, CacheConfig]:
    """The pairs measured at target NFC ``nfc``."""
    rcs = InputError(target_nfc=nfc, order=order)
    nrcs = NewtonInputError(target_nfc=nfc, order=order)
    return {
        "RFC": relcache.RFC(order=order, target_nfc=nfc),
        "RFE-Newton x RCS": CacheConfig(RelationalPlus(order, ratio="latest"), rcs),
        "RFE-trend x RCS": CacheConfig(RelationalPlus(order, newton=False), rcs),
        "RFE-mean x RCS": CacheConfig(RelationalPlus(order, newton=False, ratio="mean"), rcs),
        "RFE-Newton-trend x RCS": CacheConfig(RelationalPlus(order), rcs),
        "RFE x RCS-Newton": CacheConfig(Relational(order), nrcs),
        "RFE-Newton x RCS-Newton": CacheConfig(RelationalPlus(order, ratio="latest"), nrcs),
        "RFE-Newton-trend x RCS-Newton": CacheConfig(RelationalPlus(order), nrcs),
        "RFE-trend x RCS-Newton": CacheConfig(RelationalPlus(order, newton=False), nrcs),
        "RFCPlus": relcache.RFCPlus(order=order, target_nfc=nfc),
        # other orders of the predictor and of RCS's probe forecast
        "RFC m=1": relcache.RFC(order=1, target_nfc=nfc),
        "RFE-trend m=1 x RCS m=1": CacheConfig(RelationalPlus(1, newton=False), InputError(target_nfc=nfc, order=1)),
        "RFE-Newton-trend x RCS m=1": CacheConfig(RelationalPlus(order), InputError(target_nfc=nfc, order=1)),
        "RFE-Newton-trend m=3 x RCS": CacheConfig(RelationalPlus(3), rcs),
        "RFE-Newton-trend clip 1.25 x RCS": CacheConfig(RelationalPlus(order, clip=1.25), rcs),
        # the input-fitted increment (``InputFit``): the output moves as the input does in the span of recent moves
        "Fit x RCS": CacheConfig(InputFit(order), rcs),
        "Fit-scaled x RCS": CacheConfig(InputFit(order, scale=True), rcs),
        "Fit m=3 x RCS": CacheConfig(InputFit(3), rcs),
        "Fit m=1 x RCS": CacheConfig(InputFit(1), rcs),
        **{f"Fit{'-scaled' if sc else ''} r={r} x RCS": CacheConfig(InputFit(order, ridge=r, scale=sc), rcs)
           for r in (1e-6, 1e-4, 0.01, 0.1, 0.3) for sc in (False, True)},
        "Fit-scaled m=3 x RCS": CacheConfig(InputFit(3, scale=True), rcs),
        "Fit-blend x RCS": CacheConfig(InputFit(order, blend=True), rcs),
    }


PREDICTORS = {
    "TaylorSeer": lambda m: Taylor(m), "Newton": lambda m: Newton(m), "RFE": lambda m: Relational(m),
    "RFE-Newton": lambda m: RelationalPlus(m, ratio="latest"), "RFE-trend": lambda m: RelationalPlus(m, newton=False),
    "RFE-mean": lambda m: RelationalPlus(m, newton=False, ratio="mean"),
    "RFE-Newton-trend": lambda m: RelationalPlus(m),
    "RFE m=1": lambda m: Relational(1), "RFE-trend m=1": lambda m: RelationalPlus(1, newton=False),
    "Fit": lambda m: InputFit(m), "Fit-scaled": lambda m: InputFit(m, scale=True),
}


def main() -> None:
    parser = reference_parser(__doc__, [14, 11, 10, 8, 7], 30, "runs/plus.json")
    parser.add_argument("--model", default=str(TRANSFORMER_DIR), help="a DiTTransformer2DModel directory")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--teacher", action="store_true", help="also the teacher-forced per-module errors")
    parser.add_argument("--only", nargs="*", default=None, help="method labels to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(args.seed)
    model = DiTTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True,
                                                  low_cpu_mem_usage=False).eval()
    evaluator = load_evaluator()
    labels = torch.arange(args.samples) % 10
    t0 = time.time()
    full, _ = generate(model, labels, args.seed, None)
    trace = None
    if args.teacher:
        trace = record_trace(model, lambda: sample_digits(model, labels[:10],
                                                          generator=torch.Generator().manual_seed(args.seed)))
    rows, teacher = [], []
    for k in args.budgets:
        first_fulls = None
        for label, config in methods(k, args.order).items():
            if args.only and label not in args.only:
                continue
            out, stats = generate(model, labels, args.seed, config)
            if label == "RFC":
                first_fulls = stats[0].full_steps
            rows.append({"budget": k, "method": label, "nfc": max(st.nfc for st in stats),
                         "flops_ratio": sum(st.model_flops_fraction for st in stats) / len(stats),
                         "rel_l1": relative_l1(out, full), "fid2fc": digits_fid(evaluator, out, full)})
            r = rows[-1]
            print(f"NFC {k} {label}: nfc {r['nfc']} flops {r['flops_ratio']:.3f} rel L1 {r['rel_l1']:.4f} "
                  f"FID2FC {r['fid2fc']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
        if trace is not None and first_fulls is not None:
            for name, make in PREDICTORS.items():
                pred = make(args.order)
                errs = [float(np.mean(list(replay(pred, trace.inputs[j], trace.outputs[j], first_fulls).values())))
                        for j in range(len(trace.names))]
                teacher.append({"budget": k, "predictor": name, "full_steps": first_fulls,
                                "mean_rel_l1": float(np.mean(errs)), "per_module": errs})
                print(f"teacher-forced NFC {k} {name}: {np.mean(errs):.4f}", flush=True)
    print("| NFC | method | realised NFC | FLOPs ratio | rel L1 | x RFC | FID2FC |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((q for q in rows if q["budget"] == r["budget"] and q["method"] == "RFC"), None)
        ratio = r["rel_l1"] / ref["rel_l1"] if ref else float("nan")
        print(f"| {r['budget']} | {r['method']} | {r['nfc']} | {r['flops_ratio']:.3f} | {r['rel_l1']:.4f} | "
              f"{ratio:.2f} | {r['fid2fc']:.3f} |")
    if teacher:
        print("\n| NFC | predictor | teacher-forced rel L1 (mean over modules) |\n|---|---|---|")
        for t in teacher:
            print(f"| {t['budget']} | {t['predictor']} | {t['mean_rel_l1']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "model": args.model, "samples": args.samples, "seed": args.seed,
                                          "order": args.order, "rows": rows, "teacher": teacher}, indent=2))


if __name__ == "__main__":
    main()
