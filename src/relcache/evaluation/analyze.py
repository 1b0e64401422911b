"""``relcache analyze``: the RFC paper's Figures 1 and 2 on any supported model.

One full-computation generation is traced: the input and output of every cached module at every step.
The analyses then replay the predictors on that trace (teacher-forced: every prediction starts from the
true full-computation features, with full steps on an ``Interval(interval, 2)`` schedule):

* ``distances``: min-max-normalised L2 distance between consecutive steps, of inputs and of outputs;
* ``module_errors``: per-module relative L1 prediction error of FORA, TaylorSeer and RFE, mean over cached steps;
* ``ratio_rsd``: relative standard deviation over full steps of ``s = ‖O(a)-O(b)‖ / ‖I(a)-I(b)‖``;
* ``io_errors``: Taylor prediction errors of a module's input and output over steps, and their correlation.

The trace is held in memory (float32, on the CPU): ``trace_bytes`` says how much before any step is run, from the
cached modules' shapes on a weightless copy of the model on the meta device, and ``record_trace(max_bytes=...)`` stops
after the first step where the whole would not fit (found by review: DiT-XL-2-256 at the defaults needs 123 GiB and
was killed for memory after a long run, with nothing saved). ``save_analysis`` writes the run record (command,
settings, versions) beside the figures and CSVs, as ``run.json`` and as a footer on every figure.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods import Interval, Predictor, Relational, Reuse, Taylor
from ..methods.history import sample_norm
from ..models.base import find_adapter
from .metrics import relative_l1
from .runlog import whole


@dataclass
class Trace:
    """Per cached module (in execution order): its name and its inputs/outputs at every step."""

    names: list[str]
    inputs: list[list[torch.Tensor]]
    outputs: list[list[torch.Tensor]]

    @property
    def num_steps(self) -> int:
        return len(self.inputs[0])


class TraceTooLarge(MemoryError):
    """The trace would not fit in the memory allowed it (``record_trace(max_bytes=...)``)."""

    def __init__(self, estimate: int, limit: int) -> None:
        super().__init__(f"the trace would take {gib(estimate)} of memory, over the {gib(limit)} allowed it")
        self.estimate, self.limit = estimate, limit


def gib(n: float) -> str:
    """Bytes as "12.3 GiB" (MiB below a GiB)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _stream(spec: Any, args: tuple, kwargs: dict, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input, output) of a cached module's call that the trace keeps: the stream RCS reads, with the output it
    pairs with."""
    ins, outs = spec.inputs(args, kwargs), spec.outputs(out)
    k = spec.probe if len(ins) == len(outs) else 0
    return ins[k], outs[k]


def trace_bytes(model: nn.Module, batch: int, num_steps: int) -> int:
    """Bytes ``record_trace`` keeps for a generation of ``num_steps`` steps whose model calls take ``batch`` rows
    (samples, doubled under classifier-free guidance), for a DiT (``DiTTransformer2DModel``: the reference model and
    DiT pipelines). One call of a weightless copy of ``model`` on the meta device gives the cached modules' shapes:
    nothing is computed and no memory is taken."""
    cfg = model.config
    with torch.device("meta"):
        meta = type(model).from_config(cfg)
    per_step = [0]

    def hook(spec: Any) -> Callable[..., None]:
        def count(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            per_step[0] += 4 * sum(t.numel() for t in _stream(spec, args, kwargs, out))  # kept as float32
        return count

    handles = [spec.module.register_forward_hook(hook(spec), with_kwargs=True)
               for spec in find_adapter(meta).cached_modules(meta)]
    size = cfg.sample_size
    try:
        with torch.no_grad():
            meta(torch.empty(batch, cfg.in_channels, size, size, device="meta"),
                 timestep=torch.zeros(batch, dtype=torch.long, device="meta"),
                 class_labels=torch.zeros(batch, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return per_step[0] * num_steps


def available_memory() -> int | None:
    """Bytes of memory this process may still take: the system's available memory (``psutil`` where installed, else
    Linux's MemAvailable, else ``os.sysconf``'s free pages), less under a cgroup (container) limit; None if unknown."""
    found: list[int] = []
    try:
        import psutil

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        if not found:
            try:
                found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            except (ValueError, OSError, AttributeError):
                pass
    try:  # cgroup v2: what the container may still take
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


#: the share of the available memory a trace may take (the model, the analysis and the rest need some)
MEMORY_SHARE = 0.7


def record_trace(model: nn.Module, run: Callable[[], Any], progress: bool = False,
                 num_steps: int | None = None, max_bytes: int | None = None) -> Trace:
    """Run ``run()`` (one generation with full computation) and record every cached module's I/O; ``progress``
    shows a bar of the steps traced (``num_steps``: its total, where known). With ``max_bytes`` and ``num_steps``,
    raises ``TraceTooLarge`` once the first step is traced if ``num_steps`` such steps would take more."""
    modules = find_adapter(model).cached_modules(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in modules]
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    bar = tqdm(total=num_steps, disable=not progress, desc="trace", unit="step")
    for j, spec in enumerate(modules):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, j: int = j, spec: Any = spec) -> None:
            inp, outp = _stream(spec, args, kwargs, out)
            inputs[j].append(inp.detach().float().cpu())
            outputs[j].append(outp.detach().float().cpu())
            if j == len(modules) - 1:  # the step's last cached module: one step traced
                bar.update()
                if max_bytes is not None and num_steps and len(inputs[j]) == 1:
                    step = sum(seq[0].nbytes for seqs in (inputs, outputs) for seq in seqs if seq)
                    if step * num_steps > max_bytes:
                        raise TraceTooLarge(step * num_steps, max_bytes)
        handles.append(spec.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return Trace([m.name for m in modules], inputs, outputs)


def _minmax(v: np.ndarray) -> np.ndarray:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def step_distances(seq: Sequence[torch.Tensor]) -> np.ndarray:
    """Min-max-normalised ``‖X(i) - X(i-1)‖₂`` (mean over samples) for i = 1 .. T-1."""
    d = np.array([float(sample_norm(seq[i] - seq[i - 1]).mean()) for i in range(1, len(seq))])
    return _minmax(d)


def replay(predictor: Predictor, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
           full_steps: Sequence[int]) -> dict[int, float]:
    """Relative L1 error of ``predictor`` at every cached step, teacher-forced on a full trace."""
    state = predictor.new_state()
    fulls = set(full_steps)
    errors = {}
    for i, (inp, out) in enumerate(zip(inputs, outputs, strict=True)):
        if i in fulls:
            predictor.update(state, i, inp, out)
        elif state.ready:
            errors[i] = relative_l1(predictor.predict(state, i, len(inputs), inp), out)
    return errors


def ratio_rsd(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], full_steps: Sequence[int]) -> float:
    """Relative std over full steps of ``s`` (mean over samples), as measured at each full step."""
    s = []
    for b, a in zip(full_steps, full_steps[1:], strict=False):
        den = sample_norm(inputs[a] - inputs[b])
        s.append(float((sample_norm(outputs[a] - outputs[b]) / den).mean()))
    arr = np.array(s)
    return float(arr.std() / arr.mean()) if len(arr) > 1 and arr.mean() != 0 else float("nan")


@dataclass
class Analysis:
    """Numbers behind the figures."""

    names: list[str]
    distances: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # module -> {"input","output"}
    module_errors: dict[str, list[float]] = field(default_factory=dict)  # method -> per module
    ratio_rsd: list[float] = field(default_factory=list)  # per module
    io_errors: dict[str, dict[int, float]] = field(default_factory=dict)  # {"input","output"} -> step -> err
    io_module: str = ""
    io_correlation: float = float("nan")
    interval: int | None = None  # the full steps replayed: Interval(interval, 2)
    order: int | None = None  # of TaylorSeer and RFE


def _measurable(interval: int, num_steps: int) -> bool:
    """Whether full steps every ``interval`` (after the 2 warm-up steps) leave something to measure: 3 full steps
    (two ratios for Fig. 2b's spread) and 3 cached steps (Fig. 2c's correlation)."""
    fulls = Interval(interval, 2).full_steps(num_steps)
    return len(fulls) >= 3 and num_steps - len(fulls) >= 3


def schedule_problem(interval: int, num_steps: int) -> str | None:
    """Why ``interval`` over ``num_steps`` steps leaves the analysis nothing to measure, naming the intervals that
    would do; None when it is fine. Checked before the trace, which is the long part."""
    if _measurable(interval, num_steps):
        return None
    fine = [n for n in range(1, num_steps + 1) if _measurable(n, num_steps)]
    fulls = len(Interval(interval, 2).full_steps(num_steps))
    allowed = (f"--interval in {fine[0]}..{fine[-1]}" if fine and fine == list(range(fine[0], fine[-1] + 1))
               else f"--interval one of {fine}" if fine else "more --steps")
    return (f"--interval {interval} over --steps {num_steps} gives {fulls} full and {num_steps - fulls} cached "
            f"steps; the analysis needs at least 3 of each: use {allowed}")


def analyze_trace(trace: Trace, interval: int = 4, order: int = 2, modules: Sequence[int] | None = None,
                  io_module: int = 0) -> Analysis:
    """All four analyses on a trace; ``modules`` picks the modules for the distance curves."""
    n = len(trace.names)
    bad = [j for j in [*(modules or []), io_module] if not 0 <= j < n]
    if bad:
        raise ValueError(f"modules must be indices in 0..{n - 1} (the model has {n} cached modules), got {bad}")
    problem = schedule_problem(interval, trace.num_steps)
    if problem is not None:
        raise ValueError(problem)
    fulls = Interval(interval, 2).full_steps(trace.num_steps)
    result = Analysis(names=trace.names, io_module=trace.names[io_module], interval=interval, order=order)
    chosen = modules if modules is not None else sorted({0, len(trace.names) // 2, len(trace.names) - 1})
    for j in chosen:
        result.distances[trace.names[j]] = {
            "input": step_distances(trace.inputs[j]), "output": step_distances(trace.outputs[j])}
    methods = {"FORA": Reuse(), f"TaylorSeer m={order}": Taylor(order), f"RFE m={order}": Relational(order)}
    for label, pred in methods.items():
        result.module_errors[label] = [
            float(np.mean(list(replay(pred, trace.inputs[j], trace.outputs[j], fulls).values())))
            for j in range(len(trace.names))
        ]
    result.ratio_rsd = [ratio_rsd(trace.inputs[j], trace.outputs[j], fulls) for j in range(len(trace.names))]
    ins = trace.inputs[io_module]
    result.io_errors = {
        "input": replay(Taylor(order), ins, ins, fulls),
        "output": replay(Taylor(order), ins, trace.outputs[io_module], fulls),
    }
    steps = sorted(result.io_errors["input"])
    if len(steps) > 2:
        a = [result.io_errors["input"][s] for s in steps]
        b = [result.io_errors["output"][s] for s in steps]
        result.io_correlation = float(np.corrcoef(a, b)[0, 1])
    return result


class _Writer:
    """Writes figures and CSVs into one folder and lists what it wrote."""

    def __init__(self, out_dir: str | Path, footer: str = "", description: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self.footer, self.description = footer, description

    def figure(self, fig: Any, name: str) -> None:
        from .plots import add_footer

        bottom = add_footer(fig, self.footer)  # the run record: the figures depend on --interval and the rest
        fig.tight_layout(rect=(0, bottom, 1, 1))
        metadata = {"Title": "relcache analyze", "Software": "relcache"}
        if self.description:
            metadata["Description"] = self.description
        with whole(self.out / name) as tmp:
            fig.savefig(tmp, dpi=120, format="png", metadata=metadata)
        self.plt.close(fig)
        self.written.append(self.out / name)

    def table(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        with whole(self.out / name) as tmp, tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        self.written.append(self.out / name)


def _schedule(result: Analysis) -> str:
    """The replayed schedule, for the figures' titles."""
    if result.interval is None:
        return ""
    order = f", m={result.order}" if result.order is not None else ""
    return f"full step every {result.interval} after 2 warm-up steps (Interval({result.interval}, 2)){order}"


def _step_distances(w: _Writer, result: Analysis) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, axes = w.plt.subplots(1, len(result.distances), figsize=(4 * len(result.distances), 3.2), squeeze=False)
    rows = []
    for ax, (name, curves) in zip(axes[0], result.distances.items(), strict=True):
        steps = np.arange(1, len(curves["input"]) + 1)
        ax.plot(steps, curves["input"], "--", label="input")
        ax.plot(steps, curves["output"], label="output")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("normalised L2 distance to previous step")
        ax.legend(fontsize=8)
        rows += [[name, int(s), float(i), float(o)] for s, i, o in zip(steps, curves["input"], curves["output"],
                                                                        strict=True)]
    w.figure(fig, "fig1_step_distances.png")
    w.table("fig1_step_distances.csv", ["module", "step", "input", "output"], rows)


def _per_module(w: _Writer, result: Analysis) -> None:
    # tick labels: the module path without the common prefix ("transformer_blocks.3.ff" -> "3.ff")
    prefix = os.path.commonprefix(result.names).rpartition(".")[0] if len(result.names) > 1 else ""
    ticks = [n[len(prefix) + 1:] if prefix else n for n in result.names]
    xlabel = f"module ({prefix}.*)" if prefix else "module"
    fig, ax = w.plt.subplots(figsize=(8, 3.5))
    for label, errs in result.module_errors.items():
        ax.plot(range(len(errs)), errs, marker="o", ms=3, label=label)
    ax.set_xticks(range(len(result.names)), ticks, rotation=90, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative L1 error vs full\n(mean over cached steps)")
    ax.set_title(_schedule(result), fontsize=9)
    ax.legend(fontsize=8)
    w.figure(fig, "fig2a_module_errors.png")
    w.table("fig2a_module_errors.csv", ["module", *result.module_errors],
            [[n, *[result.module_errors[m][j] for m in result.module_errors]] for j, n in enumerate(result.names)])

    fig, ax = w.plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(result.names)), [100 * v for v in result.ratio_rsd])
    ax.set_xticks(range(len(result.names)), ticks, rotation=90, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("RSD of s over steps (%)")
    ax.set_title(f"s measured between full steps: {_schedule(result)}" if result.interval is not None else "",
                 fontsize=9)
    w.figure(fig, "fig2b_ratio_rsd.png")
    w.table("fig2b_ratio_rsd.csv", ["module", "ratio_rsd"], [[n, v] for n, v in zip(result.names, result.ratio_rsd,
                                                                                    strict=True)])


def _io_errors(w: _Writer, result: Analysis) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, ax = w.plt.subplots(figsize=(6, 3.2))
    steps = sorted(result.io_errors["input"])
    ax.plot(steps, [result.io_errors["input"][s] for s in steps], "--o", ms=3, label="input error")
    ax.plot(steps, [result.io_errors["output"][s] for s in steps], "-o", ms=3, label="output error")
    title = f"{result.io_module}: Pearson r = {result.io_correlation:.3f}"
    if result.interval is not None:
        title += f"\nTaylor m={result.order}, full step every {result.interval} after 2 warm-up steps"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (ticks said 2.5, 7.5)
    ax.set_ylabel("relative L1 prediction error")
    ax.legend(fontsize=8)
    w.figure(fig, "fig2c_io_errors.png")
    w.table("fig2c_io_errors.csv", ["step", "input_error", "output_error"],
            [[s, result.io_errors["input"][s], result.io_errors["output"][s]] for s in steps])


#: the run record's file, beside the CSVs (whose readers expect a header row first)
RUN_RECORD = "run.json"


def run_footer(run: dict[str, Any]) -> str:
    """The run record as a figure's footer: command, date, settings, versions."""
    if not run:
        return ""
    st = ", ".join(f"{k}={v}" for k, v in run.get("settings", {}).items())
    v = run.get("versions", {})
    versions = ", ".join(f"{k} {v[k]}" for k in ("relcache", "relcache commit", "torch", "diffusers") if k in v)
    return "   |   ".join(x for x in (run.get("command"), f"{run.get('date')} UTC" if run.get("date") else "",
                                      st and f"settings: {st}", versions) if x)


def save_analysis(result: Analysis, out_dir: str | Path, run: dict[str, Any] | None = None) -> list[Path]:
    """Write one PNG per analysis and the CSVs behind them, and with ``run`` (the run record: ``command``, ``date``,
    ``settings``, ``versions``, ...) ``run.json``: the record, the replayed schedule and the files written; the
    record is also each figure's footer and PNG metadata.

    An earlier ``run.json`` in ``out_dir`` goes first and the new one is written last, so a directory holding one
    describes every file in it: a save stopped part-way leaves none (found by review: the figures of two runs under
    the earlier run's record)."""
    run = run or {}
    footer = run_footer(run)
    w = _Writer(out_dir, footer=footer, description=footer.replace("   |   ", "\n"))
    (w.out / RUN_RECORD).unlink(missing_ok=True)
    _step_distances(w, result)
    _per_module(w, result)
    _io_errors(w, result)
    if run:
        path = w.out / RUN_RECORD
        record = {**run, "analysis": {"interval": result.interval, "order": result.order,
                                      "io_module": result.io_module, "io_correlation": result.io_correlation},
                  "files": [p.name for p in w.written]}
        with whole(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        w.written.append(path)
    return w.written
