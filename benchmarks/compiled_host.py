"""What a compiled step costs the host at DiT-XL/2's depth, and how much of it is dynamo's guard evaluation.

On a GPU, a cached step's kernels are few and small, so its time is set by the host: dynamo's guard checks on every
frame it enters, inductor's wrapper code, and relcache's Python around the step. This script measures that host time
on a model with XL/2's 28 blocks but hidden size 16 on one CPU thread (``host_bound.build``), so that a step's time
is mostly the host's. Each model (plain, FORA, TaylorSeer, RFC; batch modulation on unless ``--no-batch-modulation``,
50 DDIM steps) is compiled (inductor) and warmed for two generations. Then, interleaved, every call of ``--repeats``
generations is timed twice:
- with dynamo's guards evaluated, as users run;
- under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which skips guard evaluation where a frame has a
  single compiled entry that can run (unsafe in general: used here only as a measuring device, and the generations'
  outputs are compared with the guarded ones').
The difference is what guard evaluation costs per call. Calls are split into full and cached ones by relcache's own
record of the full steps (``relcache.stats``); the tables give medians over calls of the per-call medians. The guard
counts are the leaf guards of every cache entry of the frames dynamo compiled for each model, per kind (the JSON
output lists every kind); ``--guards-only`` counts them without timing anything.

    python benchmarks/compiled_host.py --repeats 7 --out OUT.json   (cpu-2026-12-05e/compiled_host_run*.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from host_bound import build
from speed import generate as speed_generate
from speed import machine_line

import relcache
from relcache.runtime import hooks as runtime_hooks

STEPS = 50
METHODS = {"plain": None, "FORA": lambda: relcache.FORA(4), "TaylorSeer m=2": lambda: relcache.TaylorSeer(4, 2),
           "RFC m=2": lambda: relcache.RFC(order=2, target_nfc=14)}


def generate(model: torch.nn.Module, log: list[float] | None = None) -> torch.Tensor:
    """One 50-step generation (``speed.generate``) of one 8x8 latent, the size ``host_bound.build`` makes."""
    return speed_generate(model, STEPS, "cpu", torch.float32, log=log, latent=8)


def leaf_guards(manager: Any, kinds: Counter[str]) -> Counter[str]:
    """``kinds`` plus the leaf guards under a guard manager (dynamo's tree of accessors), per kind, recursively: its
    children, a dictionary manager's key and value managers, and the root's epilogue (Python lambda) guards."""
    kinds.update(type(g).__name__ for g in manager.get_leaf_guards())
    for child in manager.get_child_managers():
        leaf_guards(child, kinds)
    if hasattr(manager, "get_key_value_managers"):  # a dictionary's entries (``_modules``, ``_parameters``, ...)
        for pair in manager.get_key_value_managers().values():
            for sub in pair:
                if sub is not None:
                    leaf_guards(sub, kinds)
    if hasattr(manager, "get_epilogue_lambda_guards"):
        kinds.update(type(g).__name__ for g in manager.get_epilogue_lambda_guards())
    return kinds


def guard_counts(codes: list[Any]) -> list[dict[str, int]]:
    """Per cache entry of each code object in ``codes``, its leaf guards per kind (private dynamo APIs)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return [dict(leaf_guards(entry.guard_manager.root, Counter()).most_common())
            for code in codes for entry in _debug_get_cache_entry_list(code)]


def frame_codes(model: torch.nn.Module, compiled: bool) -> list[Any]:
    """The code objects dynamo compiles a step under: relcache's entry frames (and their resumed frames), or the
    plain model's forward."""
    if not compiled:
        return [type(model).forward.__code__]
    hook = model._diffusers_hook.get_hook("relcache_step")
    codes = [fn.__code__ for fn in hook._entries.values()]
    # a frame resumed after a graph break (RCS's decision) is compiled under a code object of its own, which dynamo
    # keeps among the entry function's globals
    resumed = [getattr(fn, "__code__", None) for name, fn in vars(runtime_hooks).items()
               if name.startswith("__resume_at")]
    names = tuple(f"torch_dynamo_resume_in_{c.co_name}_at" for c in codes)
    found = {id(c): c for c in resumed if c is not None and c.co_name.startswith(names)}  # a code once
    return codes + list(found.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--guards-only", action="store_true", help="count the guards, time nothing")
    parser.add_argument("--no-batch-modulation", dest="batch_modulation", action="store_false",
                        help="enable relcache without batch modulation (each block computes its adaLN projection)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    base = build()
    print(f"{machine_line(1)}; DiT at XL/2 depth (28 blocks), hidden 16, batch 2, compiled (inductor), "
          f"{'batch modulation' if args.batch_modulation else 'no batch modulation'}, {STEPS}-step generations, "
          + ("guards counted, nothing timed" if args.guards_only else f"medians of {args.repeats}"), flush=True)
    models, plain = {}, {}
    for name, make in METHODS.items():
        model = copy.deepcopy(base)
        if make is not None:
            relcache.enable(model, make(), batch_modulation=args.batch_modulation)
        plain[name] = model
        models[name] = torch.compile(model)
        for _ in range(2):
            generate(models[name])
    modes = ("guards evaluated", "guard evaluation skipped")
    logs: dict[tuple[str, str], list[list[float]]] = {}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for _ in range(0 if args.guards_only else args.repeats):
        for mode in modes:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=mode != modes[0])
            try:
                for name, model in models.items():
                    log: list[float] = []
                    outputs[name, mode] = generate(model, log)
                    logs.setdefault((name, mode), []).append(log)
            finally:
                torch.compiler.set_stance("default")
    rows: dict[str, dict[str, Any]] = {name: {"guards_per_entry": guard_counts(frame_codes(model, name != "plain"))}
                                        for name, model in plain.items()}
    if not args.guards_only:
        print("| model | kind | calls | guards evaluated, ms | guards skipped, ms | guard evaluation, ms | outputs "
              "equal |\n|---|---|---|---|---|---|---|")
    for name, model in ({} if args.guards_only else plain).items():
        full = set(range(STEPS)) if METHODS[name] is None else set(relcache.stats(model).full_steps)
        same = rows[name]["outputs_equal"] = bool(torch.equal(*(outputs[name, m] for m in modes)))
        for kind, steps in (("full", sorted(full)), ("cached", sorted(set(range(STEPS)) - full))):
            if not steps:
                continue
            # the first call of a generation is a kind of its own (it records into empty caches): left out
            steps = [s for s in steps if s > 0]
            per = {m: statistics.median(statistics.median(log[s] for log in logs[name, m]) for s in steps) * 1e3
                   for m in modes}
            a, b = (per[m] for m in modes)
            rows[name][kind] = {"calls": len(steps), "guarded_ms": a, "skipped_ms": b}
            print(f"| {name} | {kind} | {len(steps)} | {a:.3f} | {b:.3f} | {a - b:.3f} | {same} |")
    print("\nleaf guards per compiled entry (each frame's cache entries), and the most frequent kinds:")
    for name, row in rows.items():
        entries = row["guards_per_entry"]
        print(f"- {name}: {len(entries)} entries, {sum(sum(e.values()) for e in entries)} guards in all")
        for kinds in entries:
            print(f"  - {sum(kinds.values())}: " + ", ".join(f"{k} {n}" for k, n in list(kinds.items())[:5]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "repeats": 0 if args.guards_only else args.repeats,
                                        "batch_modulation": args.batch_modulation, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
