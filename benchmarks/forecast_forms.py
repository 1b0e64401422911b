"""One module's RFE forecast in several forms on the CPU, against TaylorSeer's: a benchmark, not a test.

Eager RFC's cached step costs more than TaylorSeer's on the CPU by the input change and two per-sample norms
(docs/performance.md). This times the ways to fuse them that torch offers without a hand-written kernel, on one
module's tensors (random, the shape of a DiT-B/2 block's output at batch 2 by default), order 2:

* ``torch path``: the ops of relcache's eager forecast (``Relational.forecast``): the input change, its norm, the
  direction written over it, its norm, the coefficient and one ``addcmul`` written over the direction;
* ``TaylorSeer``: the direction and one ``addcmul`` (``DiffHistory.taylor``), what RFE is compared with;
* ``torch.compile``: the same forecast as one compiled function (inductor; compiled once, before timing);
* ``cdist``: the input change's norm by ``torch.cdist`` (no difference tensor), the rest as the torch path.

Reported: the median over ``--repeats`` rounds of the mean time per call (``--calls`` calls a round), the forms
interleaved in each round, and each form's largest difference from the torch path.

    python benchmarks/forecast_forms.py
    python benchmarks/forecast_forms.py --shape 2 4096 3072 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def _coefficient(s: torch.Tensor, moved: torch.Tensor, u: torch.Tensor, k: float) -> torch.Tensor:
    """RFE's per-sample coefficient ``s · ‖ΔI‖ / ‖u‖``, ``k`` where not finite (as ``Relational._finish``)."""
    return torch.nan_to_num(s * moved / _norm(u), nan=k, posinf=k, neginf=k)


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.view((like.shape[0],) + (1,) * (like.dim() - 1))


def torch_path(inp: torch.Tensor, a: torch.Tensor | None, d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
               row: torch.Tensor, s: torch.Tensor | None, k: float) -> torch.Tensor:
    """relcache's eager forecast, op for op (``Relational.forecast`` at order 2 with ``k`` on the host)."""
    change = inp - a
    moved = _norm(change)
    u = torch.addcmul(d1, row[1], d2, out=change)
    coef = _coefficient(s, moved, u, k)
    return torch.addcmul(d0, _per_sample(coef, u), u, out=u)


def taylor(inp: torch.Tensor, a: torch.Tensor | None, d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
           row: torch.Tensor, s: torch.Tensor | None, k: float) -> torch.Tensor:
    """TaylorSeer's forecast (``DiffHistory.taylor`` at order 2): reads neither input nor ratio."""
    u = torch.addcmul(d1, row[1], d2)
    return torch.addcmul(d0, row[0], u, out=u)


def functional(inp: torch.Tensor, a: torch.Tensor | None, d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
               row: torch.Tensor, s: torch.Tensor | None, k: float) -> torch.Tensor:
    """The forecast without ``out=`` (what a compiled function traces)."""
    moved = _norm(inp - a)
    u = torch.addcmul(d1, row[1], d2)
    coef = _coefficient(s, moved, u, k)
    return torch.addcmul(d0, _per_sample(coef, u), u)


def with_cdist(inp: torch.Tensor, a: torch.Tensor | None, d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
               row: torch.Tensor, s: torch.Tensor | None, k: float) -> torch.Tensor:
    """The torch path with the input change's norm from ``torch.cdist`` (no difference tensor made)."""
    b = inp.shape[0]
    moved = torch.cdist(inp.reshape(b, 1, -1), a.reshape(b, 1, -1)).reshape(b)
    u = torch.addcmul(d1, row[1], d2)
    coef = _coefficient(s, moved, u, k)
    return torch.addcmul(d0, _per_sample(coef, u), u, out=u)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", type=int, default=[2, 256, 768], help="a module output's shape")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds; the median is reported")
    parser.add_argument("--calls", type=int, default=300, help="calls per form per round")
    args = parser.parse_args()
    if len(args.shape) < 2 or min(args.shape) < 1 or args.repeats < 1 or args.calls < 1:
        parser.error("--shape needs at least two positive sizes (batch first); --repeats and --calls at least 1")
    torch.manual_seed(0)
    inp, a, d0, d1, d2 = (torch.randn(*args.shape) for _ in range(5))
    row, s, k = torch.tensor([3.0, 1.5, 0.0, 0.0]), torch.rand(args.shape[0]), 3.0
    operands = (inp, a, d0, d1, d2, row, s, k)
    start = time.perf_counter()
    compiled = torch.compile(functional, fullgraph=True, dynamic=False)
    compiled(*operands)
    compile_s = time.perf_counter() - start
    forms: dict[str, Callable[..., torch.Tensor]] = {
        "torch path": torch_path, "TaylorSeer": taylor, "torch.compile": compiled, "cdist": with_cdist}
    ref = torch_path(*operands)
    diffs = {name: float((fn(*operands) - ref).abs().max()) for name, fn in forms.items() if name != "TaylorSeer"}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn(*operands)
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape {tuple(args.shape)} float32, order 2; "
          f"medians of {args.repeats} rounds x {args.calls} calls; torch.compile took {compile_s:.1f} s")
    print("| form | µs per call | over the torch path | largest difference from the torch path |")
    print("|---|---|---|---|")
    base = statistics.median(times["torch path"])
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = "-" if name not in diffs or name == "torch path" else f"{diffs[name]:.1e}"
        print(f"| {name} | {med:.1f} | {med / base:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
