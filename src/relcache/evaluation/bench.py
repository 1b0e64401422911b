"""``relcache bench``: quality against compute for caching methods, measured in one run.

For every batch of seeds the full computation and each method generate the same samples, one after the
other (interleaved, so drifts in machine speed hit all methods alike). Per method it reports NFC, realized
FLOPs (``torch.utils.flop_counter``, in a separate untimed pass so the counter's overhead never enters the
timings), wall time and speed-up against full computation, quality against full computation (relative L1,
PSNR, SSIM, digits-FID2FC) and against the data (digits-FID, class accuracy).

Launched with ``torchrun --nproc-per-node P``, batches are sharded across ranks (gloo on CPU) and gathered
on rank 0, so the table equals the single-process one except for wall times.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import api
from ..methods.config import FORA, RFC, CacheConfig, CFGCache, FasterCache, TaylorSeer
from ..methods.predictors import Relational, Taylor
from ..methods.schedules import InputError, Interval
from ..runtime.accounting import measure_flops
from . import ranks
from .budgets import DEFAULT_BUDGETS, INTERVAL_FOR_NFC
from .metrics import frame_metrics, psnr, relative_l1, ssim
from .ranks import PerBatch
from .table import BenchResult, BenchRow

Sampler = Callable[..., torch.Tensor]


class Peer(Protocol):
    """Another library's cache applied to the same model (see ``evaluation/peers``)."""

    label: str

    def attach(self, model: nn.Module) -> None: ...

    def before_generation(self, model: nn.Module) -> None: ...

    def detach(self, model: nn.Module) -> None: ...


@dataclass(frozen=True)
class BenchMethod:
    """One row of the table: full computation (no config, no peer), a relcache config, or a peer."""

    label: str
    config: CacheConfig | None = None
    peer: Peer | None = None
    budget: int | None = None  # the budget it belongs to (NFC of 50 steps), for grouping
    unavailable: str | None = None  # why a peer cannot run: the row says so

    @property
    def is_full(self) -> bool:
        return self.config is None and self.peer is None and self.unavailable is None


FULL = BenchMethod("full computation")


def interval_for(budget: int, num_steps: int = 50) -> tuple[int, int]:
    """``(N, K)`` of a budget (NFC of 50 steps, the paper's table): its interval ``N`` (``INTERVAL_FOR_NFC``) and the
    NFC ``K`` of ``Interval(N, 2)`` over ``num_steps`` steps (``K = budget`` over 50)."""
    if budget not in INTERVAL_FOR_NFC:
        raise ValueError(f"budgets must be among {sorted(INTERVAL_FOR_NFC)} (NFC of 50 steps), got {budget}")
    n = INTERVAL_FOR_NFC[budget]
    return n, len(Interval(n, 2).full_steps(num_steps))


def repeated_budgets(budgets: Sequence[int], num_steps: int = 50) -> list[tuple[int, int, int]]:
    """``(budget, K, earlier)`` for each budget whose NFC ``K`` over ``num_steps`` an earlier one, ``earlier``,
    already gives: it adds no rows (``default_methods``), which the command says (found by review: dropped
    silently)."""
    seen: dict[int, int] = {}
    out = []
    for budget in budgets:
        nfc = interval_for(budget, num_steps)[1]
        if nfc in seen:
            out.append((budget, nfc, seen[nfc]))
        else:
            seen[nfc] = budget
    return out


def default_methods(budgets: Sequence[int] = DEFAULT_BUDGETS, order: int = 2, num_steps: int = 50,
                    ) -> list[BenchMethod]:
    """FORA, TaylorSeer, RFE alone, RCS alone, RFC and RFC + CFG-Cache at each budget, and FasterCache once (its
    NFC follows from its own schedule; its warm-up is 30 % of the steps, its preset's 15 at 50).

    Budgets are NFC of 50 steps (the paper's table) and name its intervals. Over ``num_steps`` other than 50 the
    interval stays, and the target-NFC methods aim at its NFC over ``num_steps`` (``interval_for``), so every
    method of a budget spends the same number of full steps. A budget whose NFC an earlier budget already took (a
    repeated budget, or few steps) adds no rows.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (the warm-up is 2 full steps), got {num_steps}")
    rows: list[BenchMethod] = []
    taken: set[int] = set()
    for budget in budgets:
        n, nfc = interval_for(budget, num_steps)
        if nfc in taken:  # (``repeated_budgets`` names these)
            continue
        taken.add(nfc)
        rows += [
            BenchMethod(f"FORA N={n}", FORA(n), budget=budget),
            BenchMethod(f"TaylorSeer N={n} m={order}", TaylorSeer(n, order), budget=budget),
            BenchMethod(f"RFE alone N={n} m={order}", CacheConfig(Relational(order), Interval(n, 2)), budget=budget),
            BenchMethod(f"RCS alone NFC={nfc} m={order}", CacheConfig(Taylor(order), InputError(target_nfc=nfc)),
                        budget=budget),
            BenchMethod(f"RFC NFC={nfc} m={order}", RFC(order=order, target_nfc=nfc), budget=budget),
            BenchMethod(f"RFC NFC={nfc} m={order} + CFG-Cache",
                        dataclasses.replace(RFC(order=order, target_nfc=nfc), cfg_cache=CFGCache()), budget=budget),
        ]
    # its warm-up, 15 of 50 steps, scaled with the steps as its docstring says (found by review: --steps 20 ran 15
    # full steps of warm-up, NFC 18 of 20, with no word)
    warmup = min(max(1, round(0.3 * num_steps)), num_steps - 1)
    label = "FasterCache (defaults)" if warmup == 15 else f"FasterCache (warmup {warmup} of {num_steps} steps)"
    rows.append(BenchMethod(label, FasterCache(warmup=warmup)))
    return rows


def select(methods: Sequence[BenchMethod], only: Sequence[str] | None) -> list[BenchMethod]:
    """The methods whose label contains one of the ``only`` substrings (all when ``only`` is empty)."""
    return [m for m in methods if not only or any(o in m.label for o in only)]


def _generate(model: nn.Module, method: BenchMethod, sampler: Sampler, labels: torch.Tensor, seed: int,
              sampler_kwargs: dict[str, Any], count_flops: bool) -> tuple[torch.Tensor, float, float, float]:
    """(samples, seconds, NFC, FLOPs) of one generation with ``method`` attached to ``model``."""
    if method.config is not None:
        # no FLOP measurement in the timed run (its first call would be timed with it): FLOPs are counted apart
        api.enable(model, method.config, count_flops=False)
    elif method.peer is not None:
        method.peer.attach(model)
    try:
        def once() -> torch.Tensor:
            if method.peer is not None:
                method.peer.before_generation(model)
            return sampler(model, labels, generator=torch.Generator().manual_seed(seed), **sampler_kwargs)

        start = time.perf_counter()
        samples = once()
        seconds = time.perf_counter() - start
        steps = sampler_kwargs.get("num_steps", 50)
        if method.config is not None:
            nfc = float(api.stats(model).nfc_per_context)  # as the full row counts: steps per call context
        elif method.peer is not None:  # measured by the peer where it can be (e.g. block executions)
            nfc = float(method.peer.nfc(model)) if hasattr(method.peer, "nfc") else math.nan
        else:
            nfc = float(steps)
        # NaN where torch's counter cannot count the model (flex attention): the table shows n/a, the run goes on
        flops = measure_flops(once, within=model) if count_flops else math.nan  # the transformer's alone
    finally:
        if method.config is not None:
            api.disable(model)
        elif method.peer is not None:
            method.peer.detach(model)
    return samples, seconds, nfc, flops


def _note_sessions(row: BenchRow, timed_in: dict[str, dict[int, str]]) -> None:
    """A resumed run's row whose batches were timed in another session than full computation's says so: its speed-up
    divides times taken apart (another load, maybe another machine), not interleaved ones. (The full row agrees with
    itself: never noted.)"""
    full, mine = timed_in.get(FULL.label, {}), timed_in.get(row.method, {})
    apart = sum(full.get(b) != s for b, s in mine.items())
    if apart:
        row.add_note(f"timed in another session than full computation on {apart} of {len(mine)} batches (resumed)")


#: how far past its ideal (full computation's NFC over its own) a row's speed-up may go before it is noted as noise
PAST_IDEAL = 1.2


def _note_past_ideal(row: BenchRow, full_nfc: float) -> None:
    """A row whose speed-up passes ``PAST_IDEAL`` times its ideal says it is timing noise: a cached step costs more
    than nothing, so only the machine's load (the full row timed while it was busier) puts a row past its ideal.
    Found by review: under load bench printed 50x at an ideal of 6.7x without a word."""
    ideal = full_nfc / row.nfc if row.nfc > 0 else math.nan
    if row.method != FULL.label and row.speedup > PAST_IDEAL * ideal:
        row.add_note(f"faster than its NFC allows ({ideal:.2f}x): timing noise, a busy machine; time it again")


def _row(method: BenchMethod, per: dict[int, tuple[torch.Tensor, float, float, float]],
         full: tuple[torch.Tensor, float, float], labels: torch.Tensor, evaluator: nn.Module | None,
         real_images: torch.Tensor | None, count_flops: bool) -> BenchRow:
    """One table row: ``method``'s batches (in batch order) against full computation's (samples, time, FLOPs)."""
    from .digits import class_accuracy, digits_fid

    if method.unavailable is not None:
        nan = math.nan
        return BenchRow(method.label, method.budget, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan,
                        note=method.unavailable)
    order = sorted(per)
    samples = torch.cat([per[b][0] for b in order])
    t, nfc, f = (sum(per[b][i] for b in order) / len(order) for i in (1, 2, 3))
    full_samples, full_time, full_flops = full
    return BenchRow(
        method=method.label, budget=method.budget, nfc=nfc, flops=f,
        flops_ratio=f / full_flops if count_flops else math.nan, time_s=t, speedup=full_time / t,
        rel_l1=relative_l1(samples, full_samples), psnr=psnr(samples, full_samples),
        ssim=ssim(samples, full_samples),
        fid2fc=digits_fid(evaluator, samples, full_samples) if evaluator is not None else math.nan,
        fid=digits_fid(evaluator, samples, real_images) if evaluator is not None and real_images is not None
        else math.nan,
        accuracy=class_accuracy(evaluator, samples, labels) if evaluator is not None else math.nan,
    )


def method_settings(methods: Sequence[BenchMethod]) -> list[dict[str, Any]]:
    """How each method is configured, as recorded in a run's files (and compared by ``--resume``)."""
    out = []
    for m in methods:
        what = repr(m.config) if m.config is not None else type(m.peer).__name__ if m.peer is not None else None
        out.append({"label": m.label, "budget": m.budget, "config": what, "unavailable": m.unavailable})
    return out


def bench_settings(*, num_samples: int, batch_size: int, num_classes: int, seed: int, num_steps: int,
                   guidance_scale: float | None, count_flops: bool, conditions: Sequence[int] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a run records and ``--resume`` compares (the methods are added by ``run_bench``)."""
    return {**(extra or {}), "num_samples": num_samples, "batch_size": batch_size,
            "conditions": list(conditions) if conditions is not None else f"classes 0..{num_classes - 1}",
            "seed": seed, "num_steps": num_steps,
            "guidance_scale": guidance_scale if guidance_scale is not None else "pipeline default",
            "count_flops": count_flops}


def run_bench(
    model: nn.Module,
    sampler: Sampler,
    methods: Sequence[BenchMethod],
    *,
    num_samples: int = 100,
    batch_size: int = 10,
    num_classes: int = 10,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float | None = 1.5,
    evaluator: nn.Module | None = None,
    real_images: torch.Tensor | None = None,
    count_flops: bool = True,
    progress: bool = True,
    out_dir: str | Path | None = None,
    resume: bool = False,
    extra_settings: dict[str, Any] | None = None,
    command: str | None = None,
    conditions: Sequence[int] | None = None,
    progress_label: str = "bench",
) -> BenchResult:
    """Generate ``num_samples`` (classes cycling, batches of ``batch_size`` seeded ``seed + b``) with full
    computation and every method, and measure each against full computation and the data.

    With ``out_dir`` every finished generation is recorded there as it ends (``runlog``), and ``resume`` continues
    the run recorded there: generations already recorded are read back instead of run, so the result equals an
    uninterrupted run's (wall times included, as they were measured). A recorded run with other settings or
    versions is refused (``ResumeError``) before any generation. ``extra_settings`` (the model, the prompts...)
    and ``command`` are recorded with the settings. Sample ``i`` is conditioned on ``conditions[i % len(conditions)]``
    (class labels, or indices of prompts for a text sampler), by default on class ``i % num_classes``.
    ``progress_label`` names the progress bar (the command running it: ``bench``, ``demo``)."""
    from . import provenance, runlog

    rank, world = ranks.start()
    methods = [FULL, *[m for m in methods if not m.is_full]]
    runnable = [m for m in methods if m.unavailable is None]
    cycle = torch.as_tensor(list(conditions) if conditions is not None else range(num_classes), dtype=torch.long)
    labels = cycle[torch.arange(num_samples) % len(cycle)]
    batches = [labels[i : i + batch_size] for i in range(0, num_samples, batch_size)]
    mine = [b for b in range(len(batches)) if b % world == rank]
    kwargs = {"num_steps": num_steps, "guidance_scale": guidance_scale}
    settings = {**bench_settings(num_samples=num_samples, batch_size=batch_size, num_classes=num_classes, seed=seed,
                                 num_steps=num_steps, guidance_scale=guidance_scale, count_flops=count_flops,
                                 conditions=conditions, extra=extra_settings),
                "methods": method_settings(methods)}
    run = {"kind": "run", "settings": settings, "versions": provenance.versions(), "date": provenance.now(),
           "command": command or provenance.command_line(), "machine": {**provenance.machine(), "world_size": world}}

    local: PerBatch = {m.label: {} for m in runnable}
    timed_in: dict[str, dict[int, str]] = {m.label: {} for m in runnable}  # the session that timed each generation
    session = "this session"  # the earlier ones are named by their log lines (``runlog.load_results``)
    log = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        header = runlog.read_header(out_dir) if resume else None
        if header is not None:
            runlog.check_resumable(out_dir, settings, run["versions"])
            sessions: dict[tuple[str, int], str] = {}
            for (label, b), gen in runlog.load_results(out_dir, set(mine), sessions).items():
                if label in local:
                    local[label][b], timed_in[label][b] = gen, sessions[(label, b)]
            this = {"date": run["date"], "command": run["command"]}
            # the run record is the first session's (its versions and machine); each resumption is listed
            run = {**run, "date": header["date"], "command": header["command"],
                   "versions": header.get("versions", run["versions"]), "machine": header.get("machine", {}),
                   "resumed": [*runlog.read_resumes(out_dir), this]}
            this = {**this, "versions": provenance.versions(), "machine": {**provenance.machine(), "world_size": world}}
        elif runlog.has_log(out_dir):
            raise runlog.ResumeError(f"{out_dir} holds an earlier run's {runlog.LOG}: resume it, or clear it first")
    todo = [(b, m) for b in mine for m in runnable if b not in local[m.label]]

    if todo:
        # one untimed warm-up generation, on the real batch shape, so first-call costs (kernel selection and memory
        # for those shapes) do not land on the first method, full computation, and inflate every speed-up. Before
        # the log is written: a run whose first generation fails (a size the pipeline refuses) leaves no earlier run
        # that the corrected command must overwrite (found by review)
        sampler(model, batches[todo[0][0]], generator=torch.Generator().manual_seed(seed), **{**kwargs, "num_steps": 2})
    if out_dir is not None:
        if world > 1:  # every rank has looked at the directory before any writes to it
            ranks.together("waiting for every rank to read the output directory", torch.distributed.barrier)
        log = runlog.RunLog(out_dir, rank, [m.label for m in runnable])
        log.start(run if header is None else {"kind": "resume", **this})
    bar = tqdm(total=len(mine) * len(runnable), initial=len(mine) * len(runnable) - len(todo), desc=progress_label,
               disable=not progress or rank != 0)
    for b, method in todo:  # interleaved: every method on a batch before the next batch
        bar.set_postfix_str(method.label)
        gen = _generate(model, method, sampler, batches[b], seed + b, kwargs, count_flops)
        local[method.label][b], timed_in[method.label][b] = gen, session
        if log is not None:
            log.append(method.label, method.budget, b, gen)
        bar.update()
    bar.close()
    per_method = ranks.gather(local, world)
    timed_in = ranks.gather(timed_in, world)

    full_per = per_method[FULL.label]
    order = sorted(full_per)
    full = (torch.cat([full_per[b][0] for b in order]), sum(full_per[b][1] for b in order) / len(order),
            sum(full_per[b][3] for b in order) / len(order))
    rows = [_row(m, per_method.get(m.label, {}), full, labels, evaluator, real_images, count_flops) for m in methods]
    samples = {m.label: torch.cat([per_method[m.label][b][0] for b in order]) for m in runnable}
    for row in rows:  # a combination that changed nothing says so (it looked like a result of its own)
        base = row.method.removesuffix(" + CFG-Cache")
        if base != row.method and row.method in samples and base in samples and torch.equal(samples[row.method],
                                                                                              samples[base]):
            row.note = row.note or f"the samples of {base}: CFG-Cache skipped nothing"
        _note_sessions(row, timed_in)
        _note_past_ideal(row, rows[0].nfc)
    per_frame = {}
    if full[0].ndim == 5:  # video (batch, frames, channels, height, width): quality frame by frame
        per_frame = {label: frame_metrics(x, full[0]) for label, x in samples.items()}
    return BenchResult(rows, {**settings, "world_size": world, "torch": torch.__version__,
                              "threads": torch.get_num_threads()}, samples, run=run, per_frame=per_frame)
