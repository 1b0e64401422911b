"""Where a compiled RFC step's host time goes: RCS's pre-pass graph, the forward's graphs, what runs outside them.

Under ``torch.compile`` an RFC step after the warmup runs RCS's pre-pass and measurement as one graph, reads the
decision on the host (the step's one graph break, ``StepCalls.settle``), and at a full step records the probe's
history there, outside the graphs; then the forward's graph runs. This script profiles every call of one DiT
generation (torch.profiler, one profile per call) and splits each call's CPU time into:

* ``pre-pass graph``: the step's first compiled graph (embeddings, the first block's norm, the input error);
* ``forward graphs``: the other compiled graphs of the call;
* ``ops outside graphs``: ATen operators that run outside every graph (the probe's history record at a full step,
  the copies of the step's rows into their static buffers);
* ``dynamo lookups``: dynamo's cache lookups (guard evaluation) of the call's frames;
* ``other host``: the rest of the profiled call (relcache's and diffusers' Python, dynamo's frame entry).

Each call is also timed unprofiled, in a generation of its own, for the step's real wall time. The profiled parts
carry the profiler's overhead: read them as shares and as differences between full and cached steps.

    python benchmarks/rcs_step_parts.py --models B --batch-modulation --out results/.../rcs_step_parts_B.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from speed import build, generate, machine_line

import relcache

PARTS = ("pre-pass graph", "forward graphs", "ops outside graphs", "dynamo lookups", "other host")
GRAPH = "## Call CompiledFxGraph"  # inductor's record_function around one compiled graph's call
LOOKUP = "TorchDynamo Cache Lookup"


def call_parts(prof: torch.profiler.profile) -> dict[str, float]:
    """One profiled call's CPU time in ms, split into ``PARTS``."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    graphs = sorted((e for e in events if e.name.startswith(GRAPH)), key=lambda e: e.time_range.start)

    def inside_graph(e: torch.autograd.profiler_util.FunctionEvent) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith(GRAPH):
                return True
            parent = parent.cpu_parent
        return False

    tops = [e for e in events if e.cpu_parent is None]
    total = (max(e.time_range.end for e in tops) - min(e.time_range.start for e in tops)) / 1e3
    parts = {
        "pre-pass graph": graphs[0].cpu_time_total / 1e3 if len(graphs) > 1 else 0.0,
        "forward graphs": sum(e.cpu_time_total for e in graphs[1 if len(graphs) > 1 else 0:]) / 1e3,
        "ops outside graphs": sum(e.self_cpu_time_total for e in events
                                  if e.name.startswith("aten::") and not inside_graph(e)) / 1e3,
        "dynamo lookups": sum(e.cpu_time_total for e in events if e.name == LOOKUP) / 1e3,
    }
    parts["other host"] = total - sum(parts.values())
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="B", choices=["T", "S", "B", "XL"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nfc", type=int, default=14, help="RFC's target_nfc")
    parser.add_argument("--batch-modulation", action="store_true", help="enable(..., batch_modulation=True)")
    parser.add_argument("--compile", metavar="MODE", default="default", help="torch.compile mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.steps < 3 or not 2 <= args.nfc <= args.steps or args.threads < 1:
        parser.error(f"need --steps >= 3, 2 <= --nfc <= --steps and --threads >= 1, got {args.steps}, {args.nfc}, "
                     f"{args.threads}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    base = build(args.models, torch.float32, "cpu")
    plain = torch.compile(copy.deepcopy(base), mode=args.compile)
    model = copy.deepcopy(base)
    relcache.enable(model, relcache.RFC(order=2, target_nfc=args.nfc), batch_modulation=args.batch_modulation)
    compiled = torch.compile(model, mode=args.compile)
    print(f"{machine_line(args.threads)}; DiT-{args.models}/2 float32 batch 2, compiled (mode={args.compile}), RFC m=2 "
          f"target_nfc={args.nfc} of {args.steps}{', batch modulation' if args.batch_modulation else ''}", flush=True)
    for _ in range(2):  # compiles every kind of step; the second generation runs as all later ones will
        generate(plain, args.steps, "cpu", torch.float32)
        generate(compiled, args.steps, "cpu", torch.float32)
    plain_log: list[float] = []
    wall: list[float] = []
    generate(plain, args.steps, "cpu", torch.float32, log=plain_log)
    generate(compiled, args.steps, "cpu", torch.float32, log=wall)
    full = set(relcache.stats(model).full_steps)
    profiled: dict[int, dict[str, float]] = {}

    @contextlib.contextmanager
    def profile(i: int) -> Iterator[None]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield
        profiled[i] = call_parts(prof)

    generate(plain, args.steps, "cpu", torch.float32, around=profile)
    plain_parts = {p: statistics.median(profiled[i][p] for i in range(args.steps)) for p in PARTS}
    profiled = {}
    generate(compiled, args.steps, "cpu", torch.float32, around=profile)
    if set(relcache.stats(model).full_steps) != full:
        print("warning: the profiled generation took other full steps than the timed one")
    warmup = 2  # RFC's default: its full steps run no pre-pass
    kinds = {"full, RCS-decided": [i for i in sorted(full) if i >= warmup],
             "cached": [i for i in range(args.steps) if i not in full]}
    plain_ms = 1e3 * statistics.median(plain_log)
    speedup = sum(plain_log) / sum(wall)
    print(f"one timed generation each: plain {sum(plain_log):.2f} s, RFC {sum(wall):.2f} s, {speedup:.2f}x, "
          f"{100 * speedup * len(full) / args.steps:.1f} % of the ideal {args.steps / len(full):.2f}x "
          f"({len(full)} full steps)")
    print("| step | calls | wall, ms | of a plain step | " + " | ".join(f"{p}, ms" for p in PARTS) + " |")
    print("|---|---|---|---|" + "---|" * len(PARTS))
    print(f"| plain | {len(plain_log)} | {plain_ms:.1f} | 100 % | "
          + " | ".join(f"{plain_parts[p]:.2f}" for p in PARTS) + " |")
    rows = {"plain": {"calls": len(plain_log), "wall_ms": plain_ms, "of_plain": 1.0, "parts_ms": plain_parts}}
    for kind, steps in kinds.items():
        if not steps:
            continue
        ms = 1e3 * statistics.median(wall[i] for i in steps)
        parts = {p: statistics.median(profiled[i][p] for i in steps) for p in PARTS}
        rows[kind] = {"calls": len(steps), "wall_ms": ms, "of_plain": ms / plain_ms, "parts_ms": parts}
        print(f"| {kind} | {len(steps)} | {ms:.1f} | {100 * ms / plain_ms:.1f} % | "
              + " | ".join(f"{parts[p]:.2f}" for p in PARTS) + " |")
    if "cached" in rows and "full, RCS-decided" in rows:
        diff = {p: rows["full, RCS-decided"]["parts_ms"][p] - rows["cached"]["parts_ms"][p] for p in PARTS}
        print("full minus cached, profiled: " + ", ".join(f"{p} {v:+.2f} ms" for p, v in diff.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "model": args.models, "compile": args.compile,
                                        "batch_modulation": args.batch_modulation, "nfc": args.nfc,
                                        "steps": args.steps, "full_steps": sorted(full), "speedup": speedup,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
