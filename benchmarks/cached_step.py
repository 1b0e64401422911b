"""What one cached step costs, measured directly: the less noisy companion of speed.py's derived column.

On a DiT architecture with random weights (batch 2, CFG batched), each method computes the first 4 steps
fully and then caches every step (an interval longer than the run, or RFC with an infinite threshold);
the mean time of the next 12 steps is one cached step. Full steps are timed the same way with caching off.
Methods are interleaved in each repeat; medians are reported.

    python benchmarks/cached_step.py --models B --repeats 5
    python benchmarks/cached_step.py --models B --repeats 1 --profile   # where a FORA cached step's time goes
    python benchmarks/cached_step.py --models XL --dtype bfloat16 --profile "Relational m=2 (RFE alone)"
    python benchmarks/cached_step.py --models T S --repeats 3 --compile default   # compiled steps (inductor)

The last column counts the kernel-launching operators of one step (views excluded), the same on any device.
The two floor rows bound what caching can reach under the spec, which recomputes every block's gate, shift and
scale from the current timestep: the adaLN projections alone (timestep-and-class embedding, each block's adaLN
projection, the final layer's), and the least a reuse step must do (those, each block's two gated residual adds
and the final layer, written by hand). Below the table, each is turned into the most of the ideal speed-up
T / NFC that a method whose cached steps cost that much could reach.

With ``--compile MODE`` the steps run under ``torch.compile(model, mode=MODE)`` (after ``relcache.enable``) instead,
and the floors are left out. Each method is compiled afresh (``torch._dynamo.reset()``: dynamo's recompile limit is
shared by every enabled model), warmed with one untimed 16-step generation (which compiles every kind of step), then
its ``--repeats`` generations run back to back: not interleaved with the other methods, so run it on a quiet machine.
The kernel column then counts, in one cached step, the kernels the step really runs: on
the CPU each C++ kernel inductor generated (the Python wrapper's calls of its ``kernel`` functions, seen with
``sys.setprofile``) plus each ATen kernel torch.profiler records outside them (extern calls such as ``addmm`` and
convolutions, and what runs eagerly: RCS's pre-pass and decision, relcache's per-step rows); on a GPU the host's
kernel launches. A column gives what runs outside the forward's graphs (eager ATen kernels). With ``--profile`` the
profiler's table of the method's compiled cached steps follows, with the time outside the graphs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from speed import SIZES, build
from torch.utils._python_dispatch import TorchDispatchMode

import relcache
from relcache import CacheConfig, Interval, Linear, Relational, Reuse, Taylor
from relcache.methods import fused
from relcache.methods.fit import InputFit

METHODS: dict[str, CacheConfig | None] = {
    "full step": None,
    "full step, relcache on (FORA(1, 1))": relcache.FORA(1, 1),
    "Reuse (FORA)": CacheConfig(Reuse(), Interval(1000, 4)),
    "Linear (FasterCache's predictor)": CacheConfig(Linear(0.5), Interval(1000, 4)),
    "Taylor m=2 (TaylorSeer)": CacheConfig(Taylor(2), Interval(1000, 4)),
    "Relational m=2 (RFE alone)": CacheConfig(Relational(2), Interval(1000, 4)),
    "Relational m=2 + RCS check (RFC)": relcache.RFC(threshold=1e30, warmup=4),
    # RFC+ fit's predictor (issue 19), on the same schedule as RFE alone: its cached step against RFE's
    "InputFit m=2, scaled (RFC+ fit)": CacheConfig(InputFit(2, scale=True), Interval(1000, 4)),
}
#: RFC with the cache storages of issue 20 (docs/performance.md, "Cache memory"): what a cached step pays to read
#: (and a full step to write) quantized or packed caches
STORAGES = {
    "bfloat16 caches": relcache.CacheStorage(torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "int8 base and input, int4 diffs": relcache.CacheStorage("int8", "int4", "int8"),
    "float8 base and input, int4 diffs": relcache.CacheStorage(torch.float8_e4m3fn, "int4", torch.float8_e4m3fn),
}
METHODS.update({f"RFC, {label}": dataclasses.replace(relcache.RFC(threshold=1e30, warmup=4), cache_dtype=storage)
                for label, storage in STORAGES.items()})
#: the same methods with ``enable(..., batch_modulation=True)``: every step's adaLN projections computed up front
BATCHED = " + batch modulation"
METHODS.update({name + BATCHED: METHODS[name] for name in (
    "full step, relcache on (FORA(1, 1))", "Reuse (FORA)", "Taylor m=2 (TaylorSeer)",
    "Relational m=2 + RCS check (RFC)")})
#: RFE's forecast in two Triton kernels (``relcache.methods.fused``, opt-in; CUDA only: elsewhere the torch path runs)
FUSED = " + fused forecast"
METHODS.update({name + FUSED: METHODS[name] for name in (
    "Relational m=2 (RFE alone)", "Relational m=2 + RCS check (RFC)")})


# ops that launch no kernel (views and metadata); everything else counts as one launch on a GPU
_VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "slice", "select", "unsqueeze", "squeeze",
          "t", "transpose", "permute", "detach", "alias", "as_strided", "split", "split_with_sizes", "chunk", "unbind",
          "lift_fresh"}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators that run a kernel: on a GPU, each is one launch the host has to issue."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _generation(model: torch.nn.Module, config: CacheConfig | None, device: str, dtype: torch.dtype,
                batched: bool = False) -> Iterator[Callable[[int], None]]:
    """``step(i)`` of a 50-step generation with ``config`` enabled (None: caching off), under no_grad; ``batched``:
    with batch modulation, the timesteps announced."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g).to(device=device, dtype=dtype)
    labels = torch.tensor([207, 1000], device=device)

    def step(i: int) -> None:
        model(x + 0.01 * i, timestep=torch.full((2,), 999 - 20 * i, device=device), class_labels=labels)

    if config is not None:
        relcache.enable(model, config, batch_modulation=batched)
        relcache.begin_generation(model, timesteps=[999 - 20 * i for i in range(50)])
    try:
        with torch.no_grad():
            yield step
    finally:
        if config is not None:
            relcache.disable(model)


ADALN = "floor: the adaLN projections alone"
REUSE_MIN = "floor: the least a reuse step must do"


def _adaln_floor(model: torch.nn.Module, device: str, dtype: torch.dtype) -> Callable[[int], None]:
    """``step(i)`` of what the spec recomputes at every step and no method can skip or share: the embedding of the
    timestep and class (once, as with shared copies) and, from it, every block's adaLN projection and the final
    layer's. On DiT these matrix-vector products read most of the weights a cached step reads."""
    labels = torch.tensor([207, 1000], device=device)
    blocks = model.transformer_blocks

    def step(i: int) -> None:
        emb = blocks[0].norm1.emb(torch.full((2,), 999 - 20 * i, device=device), labels, hidden_dtype=dtype)
        for block in blocks:
            block.norm1.linear(block.norm1.silu(emb))
        model.proj_out_1(torch.nn.functional.silu(emb))

    return step


def _reuse_floor(model: torch.nn.Module, device: str, dtype: torch.dtype) -> Callable[[int], None]:
    """``step(i)`` of the least a cached step returning stored outputs must do under the spec, written by hand:
    the adaLN projections, each block's two gated residual adds (one fused ``addcmul`` each) and the final layer.
    It skips the block norms and modulations that only feed cached modules, which relcache's FORA still runs."""
    labels = torch.tensor([207, 1000], device=device)
    blocks = model.transformer_blocks
    g = torch.Generator().manual_seed(0)
    shape = (2, 256, blocks[0].norm1.linear.in_features)
    stored = [(torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype))
              for _ in blocks]
    h0 = torch.randn(shape, generator=g).to(device, dtype)

    def step(i: int) -> None:
        emb = blocks[0].norm1.emb(torch.full((2,), 999 - 20 * i, device=device), labels, hidden_dtype=dtype)
        h = h0
        for block, (attn, ff) in zip(blocks, stored, strict=True):
            _, _, gate_msa, _, _, gate_mlp = block.norm1.linear(block.norm1.silu(emb)).chunk(6, dim=1)
            h = torch.addcmul(h, gate_msa[:, None], attn)
            h = torch.addcmul(h, gate_mlp[:, None], ff)
        shift, scale = model.proj_out_1(torch.nn.functional.silu(emb)).chunk(2, dim=1)
        model.proj_out_2(model.norm_out(h) * (1 + scale[:, None]) + shift[:, None])

    return step


FLOORS = {ADALN: _adaln_floor, REUSE_MIN: _reuse_floor}


@contextlib.contextmanager
def _steps(model: torch.nn.Module, name: str, device: str, dtype: torch.dtype) -> Iterator[Callable[[int], None]]:
    """``step(i)`` of method ``name`` (a generation with ``METHODS[name]``) or of floor ``name``."""
    if name in FLOORS:
        with torch.no_grad():
            yield FLOORS[name](model, device, dtype)
    else:
        fused.set_enabled(name.endswith(FUSED))
        try:
            with _generation(model, METHODS[name], device, dtype, name.endswith(BATCHED)) as step:
                yield step
        finally:
            fused.set_enabled(None)  # as the environment says again


def step_ops(model: torch.nn.Module, name: str, device: str, dtype: torch.dtype) -> int:
    """Kernel-launching operators in step 4 of a generation with ``METHODS[name]`` (a cached step; None: a full
    step), or of a floor.

    Independent of the device and of the model's width: where a GPU is launch-bound (small batches), a step's
    host time is about this count times the cost of one launch."""
    counter = _OpCounter()
    with _steps(model, name, device, dtype) as step:
        for i in range(4):
            step(i)
        before = fused.launches
        with counter:
            step(4)
    return sum(counter.counts.values()) + fused.launches - before  # the fused forecast's Triton kernels too


def step_ms(model: torch.nn.Module, name: str, device: str, dtype: torch.dtype, profile: bool = False) -> float:
    """Mean milliseconds of steps 4..15 of a generation with ``METHODS[name]`` (None: caching off), or of the
    a floor; ``profile`` prints torch.profiler's tables of those steps."""
    with _steps(model, name, device, dtype) as step:
        for i in range(4):
            step(i)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
            for i in range(4, 16):
                step(i)
            if device == "cuda":
                torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / 12 * 1e3
    if prof is not None:
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=12))
        if device == "cuda":  # on a GPU the host's launches and the device's kernels are separate budgets
            print(table.table(sort_by="self_device_time_total", row_limit=12))
    return elapsed


# ATen ops that run no kernel of their own (views, allocations, no-op conversions) or whose work is a child op's
_NO_KERNEL = _VIEWS | {"empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg", "detach_", "resize_",
                       "as_strided_", "narrow", "flatten", "contiguous", "to", "linear", "conv2d", "reshape"}


def _is_aten_kernel(event: object) -> bool:
    name = event.name
    return name.startswith("aten::") and name[6:] not in _NO_KERNEL


def _in_graph(event: object) -> bool:
    """Whether ``event`` ran inside a compiled graph (the call of an inductor-compiled FX graph)."""
    parent = event.cpu_parent
    while parent is not None:
        if "CompiledFxGraph" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def count_kernels(events: list, device: str, generated: int = 0) -> tuple[int, int]:
    """``(kernels, outside)``: the kernels a profiled step ran, and how many of them ran outside compiled graphs.

    On a GPU: the host's kernel launches (``cudaLaunchKernel`` and the like). On the CPU: ``generated`` (the C++
    kernels inductor generated that the step called, ``_KernelCalls``) and each ATen op that runs a kernel and calls
    no such op beneath it (``aten::to`` -> ``_to_copy`` -> ``copy_`` is one kernel, ``copy_``; views and allocations
    are none)."""
    if device == "cuda":
        launches = [e for e in events if "LaunchKernel" in e.name or e.name.startswith("cudaGraphLaunch")]
        return len(launches), sum(1 for e in launches if not _in_graph(e))
    counted: set[int] = set()
    covered: set[int] = set()  # events with a counted event in their subtree
    for e in sorted(events, key=lambda e: -_depth(e)):  # children first
        below = any(id(c) in covered for c in e.cpu_children)
        if _is_aten_kernel(e) and not below:
            counted.add(id(e))
        if below or id(e) in counted:
            covered.add(id(e))
    kernels = [e for e in events if id(e) in counted]
    return generated + len(kernels), sum(1 for e in kernels if not _in_graph(e))


class _KernelCalls:
    """Counts the calls of inductor's generated C++ kernels (Python-bound functions named ``kernel``, called from a
    compiled graph's wrapper) while active: torch.profiler does not see them unless each is compiled with a record
    function (``cpp.enable_kernel_profile``), which names every kernel apart and so compiles each block's anew."""

    def __init__(self) -> None:
        self.calls = 0

    def _profile(self, frame: object, event: str, arg: object) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) == "kernel" and str(
                getattr(arg, "__module__", "")).endswith(".kernel"):
            self.calls += 1

    def __enter__(self) -> _KernelCalls:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


def _depth(event: object) -> int:
    d, parent = 0, event.cpu_parent
    while parent is not None:
        d, parent = d + 1, parent.cpu_parent
    return d


def compiled_steps(model: torch.nn.Module, name: str, mode: str, device: str, dtype: torch.dtype, repeats: int,
                   profile: bool = False) -> tuple[list[float], int, int]:
    """Milliseconds per step (mean of steps 4..15, one entry per generation) of method ``name`` under
    ``torch.compile(model, mode=mode)``, and the kernels of step 6, a cached step (all of them, and those outside the
    compiled graphs). ``profile`` prints torch.profiler's table of steps 4..15 of one more generation."""
    config = METHODS[name]
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g).to(device=device, dtype=dtype)
    labels = torch.tensor([207, 1000], device=device)
    if config is not None:
        relcache.enable(model, config, batch_modulation=name.endswith(BATCHED))
    try:
        compiled = torch.compile(model, mode=mode)

        def step(i: int, prof: object = None) -> None:
            args = x + 0.01 * i, torch.full((2,), 999 - 20 * i, device=device)
            with prof or contextlib.nullcontext():  # the model call alone, not the loop's own arithmetic
                compiled(args[0], timestep=args[1], class_labels=labels)

        def generation(stop: int = 16, prof: object = None) -> float:
            if config is not None:
                relcache.begin_generation(model, timesteps=[999 - 20 * i for i in range(16)])
            for i in range(4):
                step(i)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with prof or contextlib.nullcontext():
                for i in range(4, stop):
                    step(i)
                if device == "cuda":
                    torch.cuda.synchronize()
            return (time.perf_counter() - start) / (stop - 4) * 1e3

        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
            generation()  # compiles every kind of step
            times = [generation() for _ in range(repeats)]
            generation(stop=6)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=activities)
            with _KernelCalls() as calls:
                step(6, prof)
            kernels, outside = count_kernels(list(prof.events()), device, calls.calls)
            if profile:
                print(f"\n{name}, compiled (mode={mode}), steps 4-15 profiled:")
                prof = torch.profiler.profile(activities=activities)
                generation(prof=prof)  # steps 0-3 run unprofiled
                _print_compiled_profile(prof, device)
    finally:
        if config is not None:
            relcache.disable(model)
        torch._dynamo.reset()
    return times, kernels, outside


def _print_compiled_profile(prof: object, device: str) -> None:
    """The profiler's table, and the share of the steps' time spent inside the forward's compiled graphs."""
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))
    events = list(prof.events())
    steps = [e for e in events if e.cpu_parent is None and e.name.startswith("Torch-Compiled Region")]
    graphs = [e for e in events if "CompiledFxGraph" in e.name]
    total = sum(e.cpu_time_total for e in steps)
    inside = sum(e.cpu_time_total for e in graphs)
    print(f"compiled calls: {len(steps)}, {total / 1e3:.1f} ms in all; inside the graphs: {inside / 1e3:.1f} ms "
          f"({100 * inside / max(total, 1e-9):.1f} %); outside (host work, guards, eager code): "
          f"{(total - inside) / 1e3:.1f} ms")


def main_compiled(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """``main`` under ``--compile``: every method's compiled steps, method after method."""
    for size in args.models:
        model = build(size, dtype, args.device)
        names = [name for name in METHODS if name in {"full step", "Reuse (FORA)", *(args.methods or METHODS)}]
        rows = {name: compiled_steps(model, name, args.compile, args.device, dtype, args.repeats,
                                     profile=name == args.profile) for name in names}
        full = statistics.median(rows["full step"][0])
        fora = rows["Reuse (FORA)"][1]
        modules = 2 * len(model.transformer_blocks)
        print(f"\nDiT-{size}/2 {args.dtype} on {args.device}, compiled (mode={args.compile}), {args.repeats} "
              f"generations each, not interleaved; {modules} cached modules")
        print("| step | ms (median) | / full step | kernels | - FORA's, per cached module | outside the graphs |")
        print("|---|---|---|---|---|---|")
        for name, (ts, kernels, outside) in rows.items():
            ms = statistics.median(ts)
            print(f"| {name} | {ms:.1f} | {100 * ms / full:.1f} % | {kernels} | {(kernels - fora) / modules:+.2f} | "
                  f"{outside} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["B"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--profile", nargs="?", const="Reuse (FORA)", choices=list(METHODS), metavar="METHOD",
                        help="profile the steps of METHOD (default: FORA's cached steps) after the timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", metavar="MODE",
                        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
                        help="time and count the steps under torch.compile(model, mode=MODE) instead (no floors)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                        help="with --compile, only these (and the full step and FORA, which the table compares with)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--fused", action="store_true",
                        help="also RFE and RFC with the fused forecast (two Triton kernels per module on CUDA)")
    args = parser.parse_args()
    if args.fused and args.compile:
        parser.error("--fused times eager steps (compiled steps never take the fused forecast): drop --compile")
    # partial generations on purpose (a primed step, the first steps of a generation): not worth a warning each
    warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        main_compiled(args, dtype)
        return
    for size in args.models:
        model = build(size, dtype, args.device)
        # --methods picks rows; the full step, FORA's and TaylorSeer's (the columns' references) always run
        always = {"full step", "Reuse (FORA)", "Taylor m=2 (TaylorSeer)"}
        picked = set(args.methods or ()) | {name + FUSED for name in args.methods or ()}  # with --fused: its variant
        names = [name for name in [*METHODS, *FLOORS] if (not args.methods or name in always or name in picked)
                 and (args.fused or not name.endswith(FUSED))]
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                times[name].append(step_ms(model, name, args.device, dtype))
        full = statistics.median(times["full step"])
        taylor = statistics.median(times["Taylor m=2 (TaylorSeer)"])
        ops = {name: step_ops(model, name, args.device, dtype) for name in names}
        print(f"\nDiT-{size}/2 {args.dtype} on {args.device}, {args.repeats} repeats")
        print("| step | ms (median) | / full step | - Taylor step, ms | kernel launches |")
        print("|---|---|---|---|---|")
        for name, ts in times.items():
            ms = statistics.median(ts)
            print(f"| {name} | {ms:.1f} | {100 * ms / full:.1f} % | {ms - taylor:+.1f} | {ops[name]} |")
        if any(name.endswith(FUSED) for name in times):
            print(f"- rows{FUSED}: on CUDA the launches include the forecast's 2 Triton kernels per cached module; "
                  "under Triton's CPU interpreter (TRITON_INTERPRET=1) they run interpreted (slow; the counts include "
                  "its host work); elsewhere they run the torch path")
        for name in (n for n in FLOORS if n in times):
            floor = statistics.median(times[name]) / full
            bounds = ", ".join(f"{100 * nfc / (nfc + (50 - nfc) * floor):.1f} % at NFC {nfc}" for nfc in (14, 7))
            print(f"- {name} ({100 * floor:.1f} % of a full step): at most {bounds} of the ideal speed-up")
        if args.profile:
            print(f"\n{args.profile}, steps 4-15 of DiT-{size}/2, profiled:")
            step_ms(model, args.profile, args.device, dtype, profile=True)


if __name__ == "__main__":
    main()
