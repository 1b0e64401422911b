"""Does every family's cached step compile as DiT's does? Graph breaks and graphs per generation, by family.

For each family's tiny pipeline (the tests' random-weight configs, tests/families.py), with a dynamo backend that
only records graphs (tracing and guards are what relcache interacts with; code generation adds nothing here):
* plain: ``torch.compile(pipe.transformer)`` alone, two generations: the model's own graph breaks (those dynamo
  resumes after, and those that make it run a whole frame eagerly);
* relcache: ``relcache.enable(pipe, METHOD)`` then the same compile, ``--generations`` generations: graphs each
  generation compiled (0 after the first: no recompilation) and the graph breaks by place. relcache's own are
  ``step`` (the step hook's skipped frame) and ``settle`` (the host's read of RCS's decision); any other is the
  model's own, and must also appear in the plain row (each kind of step traces the model's breaking code again, so
  its count grows).

    python benchmarks/compile_families.py --out benchmarks/results/cpu-2026-12-05c/compile_families_rfc.json
    python benchmarks/compile_families.py --method TaylorSeer --families flux sd3
    python benchmarks/compile_families.py --families hunyuan_video15 framepack --recompile-limit 16

The JSON is rewritten after each family, so an interrupted run keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' tiny models
from conftest import recording_backend  # noqa: E402
from families import CASES, generate  # noqa: E402

import relcache  # noqa: E402

METHODS = {"RFC": lambda: relcache.RFC(threshold=0.3), "TaylorSeer": lambda: relcache.TaylorSeer(3)}
OWN = ("step", "settle")


def _site(text: str) -> str:
    """A graph break's place: relcache's two by name, any other by the first line of dynamo's reason."""
    if "StepHook._step" in text:
        return "step"
    if "StepCalls.settle" in text:
        return "settle"
    return text.strip().splitlines()[0][:80]


def compile_counts(name: str, method: str | None, generations: int, steps: int) -> dict[str, object]:
    """Graphs per generation and graph breaks by place of one family's pipeline, compiled with ``method``
    enabled first (None: plain)."""
    case = CASES[name]
    torch._dynamo.reset()
    counters.clear()
    graphs: list[torch.fx.GraphModule] = []
    pipe = case.build()
    if method is not None:
        relcache.enable(pipe, METHODS[method]())
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend=recording_backend(graphs))
        per: list[int] = []
        for _ in range(generations):
            before = len(graphs)
            generate(pipe, case, steps=steps)
            per.append(len(graphs) - before)
        nfc = relcache.stats(pipe).nfc if method is not None else steps
    finally:
        if method is not None:
            relcache.disable(pipe)
        torch._dynamo.reset()
    breaks: collections.Counter[str] = collections.Counter()
    # dynamo counts a break it resumes after under "graph_break", and one that makes it give up a whole frame (run
    # eagerly) under "unimplemented": the same break can land in either, as the frames around it differ
    for kind in ("graph_break", "unimplemented"):
        for text, n in counters[kind].items():
            breaks[_site(text)] += n
    return {"graphs": per, "breaks": dict(breaks), "nfc": nfc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="RFC", choices=list(METHODS))
    parser.add_argument("--families", nargs="+", default=list(CASES), choices=list(CASES), metavar="FAMILY",
                        help="tests/families.py's names (default: all)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--recompile-limit", type=int, help="set torch._dynamo.config.recompile_limit (default: "
                        f"dynamo's, {torch._dynamo.config.recompile_limit})")
    parser.add_argument("--out", type=Path, help="JSON of every row, rewritten after each family")
    args = parser.parse_args()
    if args.recompile_limit is not None:
        if args.recompile_limit < 1:
            parser.error(f"--recompile-limit must be a positive integer, got {args.recompile_limit}")
        torch._dynamo.config.recompile_limit = args.recompile_limit
    if args.generations < 2 or args.steps < 4:
        parser.error(f"--generations must be at least 2 and --steps at least 4, got {args.generations}, {args.steps}")
    warnings.filterwarnings("ignore")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {platform.node()} torch {torch.__version__}; "
          f"{args.method}, {args.steps} steps, {args.generations} generations, recording backend, "
          f"recompile_limit {torch._dynamo.config.recompile_limit}")
    print(f"| family | plain: breaks | {args.method}: graphs per generation | {args.method}: breaks | NFC | "
          "relcache's only |")
    print("|---|---|---|---|---|---|")
    rows: dict[str, object] = {}
    for name in args.families:
        plain = compile_counts(name, None, 2, args.steps)
        cached = compile_counts(name, args.method, args.generations, args.steps)
        others = {site for site in cached["breaks"] if site not in OWN}
        ok = not others and all(n == 0 for n in cached["graphs"][1:])
        rows[name] = {"plain": plain, args.method: cached, "only_relcache_breaks": not others,
                      "others_in_plain": others <= set(plain["breaks"]), "ok": ok}
        own = ", ".join(f"{site} {n}" for site, n in cached["breaks"].items() if site in OWN)
        other = "; ".join(f"{site} ({n})" for site, n in cached["breaks"].items() if site not in OWN)
        print(f"| {name} | {sum(plain['breaks'].values())} | {cached['graphs']} | {own}{'; ' + other if other else ''}"
              f" | {cached['nfc']} | {'yes' if ok else 'no' if others <= set(plain['breaks']) else 'NO: new'} |",
              flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"torch": torch.__version__, "method": args.method, "steps": args.steps,
                                            "recompile_limit": torch._dynamo.config.recompile_limit, "rows": rows},
                                           indent=1))
    new = [name for name, row in rows.items() if not row["others_in_plain"]]
    recompiled = [name for name, row in rows.items() if any(row[args.method]["graphs"][1:])]
    print(f"{len(rows)} families: {sum(row['ok'] for row in rows.values())} compile with relcache's breaks only and "
          f"no recompilation; breaks not in the plain model: {new or 'none'}; recompiled after the first "
          f"generation: {recompiled or 'none'}")


if __name__ == "__main__":
    main()
