"""What dynamo's handling of relcache's step hook costs a compiled step: skipped in C, or called back at every step.

relcache's step hook runs on the host, in a frame dynamo must skip while compiling what it calls
(``torch._dynamo.disable(recursive=False)``). dynamo skips such a frame anew at every call, through its frame
callback in Python; relcache marks the frame's code skipped instead (``hooks._skip_frame_in_c``), which dynamo then
does in C. This script times compiled generations of a DiT both ways, interleaved, on a model small enough that
the host sets a step's pace (DiT-T/2: 2 blocks, width 64), as a GPU step is set by its host when launches are cheap.
"Called back" puts dynamo's default back on the code for those generations, as relcache did before.

    python benchmarks/step_host.py --models T --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from speed import build, generate, machine_line
from torch._dynamo.eval_frame import set_code_exec_strategy, skip_code
from torch._dynamo.types import FrameAction, FrameExecStrategy

import relcache
from relcache.runtime.hooks import StepHook

METHODS = {"FORA": lambda: relcache.FORA(4), "TaylorSeer m=2": lambda: relcache.TaylorSeer(4, 2),
           "RFC m=2": lambda: relcache.RFC(order=2, target_nfc=14)}
STEPS = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="T", choices=["T", "S", "B"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be positive integers, got {args.repeats}, {args.threads}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    base = build(args.models, torch.float32, "cpu")
    code = StepHook._step.__code__
    modes = {"called back (dynamo's default)": lambda: set_code_exec_strategy(
                 code, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT)),
             "skipped in C (relcache)": lambda: skip_code(code)}
    print(f"{machine_line(args.threads)}; DiT-{args.models}/2 float32 batch 2, compiled (inductor), batch modulation, "
          f"{STEPS}-step generations, medians of {args.repeats}", flush=True)
    models = {}
    for name, make in METHODS.items():
        model = copy.deepcopy(base)
        relcache.enable(model, make(), batch_modulation=True)
        models[name] = torch.compile(model)
        for _ in range(2):  # compiles every kind of step
            generate(models[name], STEPS, "cpu", torch.float32)
    times: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, compiled in models.items():
            for mode, apply in modes.items():
                apply()
                start = time.perf_counter()
                outputs[name, mode] = generate(compiled, STEPS, "cpu", torch.float32)
                times.setdefault((name, mode), []).append(time.perf_counter() - start)
    skip_code(code)
    before, after = modes
    print(f"| method | {before}, ms/step | {after}, ms/step | saved, ms/step | saved | outputs equal |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name in models:
        a, b = (1e3 * statistics.median(times[name, m]) / STEPS for m in modes)
        same = bool(torch.equal(outputs[name, before], outputs[name, after]))
        rows[name] = {"called_back_ms": a, "skipped_ms": b, "same": same}
        print(f"| {name} | {a:.3f} | {b:.3f} | {a - b:.3f} | {100 * (a - b) / a:.1f} % | {same} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "model": args.models, "repeats": args.repeats,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
