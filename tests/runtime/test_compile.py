"""A cached step compiles into whole graphs: counted with dynamo's own counters on a tiny diffusers DiT.

What is counted (torch._dynamo's graph-break counter and a backend that records each graph it is given):
* the only graph break is relcache's step hook, whose own frame is skipped so that the step's bookkeeping and
  decision run on the host before the transformer's forward; the forward is then one frame, traced whole;
* every kind of step (full, cached, each order of the forecast while it grows) compiles once, in the first
  generation: a second generation compiles nothing;
* a context's first call, which records into empty caches, runs eagerly only once: the first generation runs it
  again compiled (``StepCalls.rehearse``), and later generations replay that graph, with no step run eagerly;
* outputs, full steps and FLOP counts equal the eager run's;
* a later generation's steps run no kernel outside the graphs but copies into static buffers (torch.profiler, in the
  same runs).
The backend only records: dynamo's tracing, guards and recompilations are what interact with relcache, and code
generation (inductor) would take minutes on this CPU without telling more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import torch
from conftest import count_eager_calls, recording_backend, run_loop, tiny_dit
from torch._dynamo.utils import counters

import relcache
from relcache import FORA, RFC, CacheConfig, CFGCache, FasterCache, InputError, Interval, Relational, Taylor, TaylorSeer
from relcache.api import _session
from relcache.models.dit import DiTAdapter

#: two blocks: dynamo's tracing time grows with the blocks (three took twice as long), and two keep a first block
#: (RCS's probe) and a later one
LAYERS = 2
#: one block, for schedules that read no probe in a first block (not RCS): it traces in about half the time of two
ONE_BLOCK = 1
STEPS = 10
CONFIGS = {
    "FORA": FORA(3),
    "TaylorSeer": TaylorSeer(3),
    "RFE alone": CacheConfig(Relational(2), Interval(3, 2)),
    "RCS alone": CacheConfig(Taylor(2), InputError(threshold=0.3)),
    "RFC threshold": RFC(threshold=0.3),
    "RFC target NFC": RFC(target_nfc=5),
    "RFC+ with calibrated steps": relcache.RFCPlus(full_steps=[0, 1, 4, 7]),
    "RFC+ fit with calibrated steps": relcache.RFCPlus(full_steps=[0, 1, 4, 7], fit=True),
    "FasterCache, no CFG-Cache": dataclasses.replace(FasterCache(warmup=2, interval=3), cfg_cache=None),
    "FasterCache on a CFG batch": FasterCache(warmup=2, interval=3, cfg_window=(0.36, 1.0), cfg_phase="window",
                                              cfg_refresh_full=False),
    "TaylorSeer + CFG-Cache on a CFG batch": dataclasses.replace(
        TaylorSeer(3), cfg_cache=CFGCache(interval=4, skip_full=True)),
    "TaylorSeer + CFG-Cache(align=False) on a CFG batch": dataclasses.replace(
        TaylorSeer(3), cfg_cache=CFGCache(interval=3, align=False)),
    "RFC + CFG-Cache on a CFG batch": dataclasses.replace(
        RFC(threshold=0.4), cfg_cache=CFGCache(interval=3, skip_full=True)),
    "RFC + CFG-Cache(align=False) on a CFG batch": dataclasses.replace(
        RFC(threshold=0.4), cfg_cache=CFGCache(interval=3, align=False)),
}


class _NoSharing(DiTAdapter):
    """Eager relcache computes DiT's shared embedding copies once per call (runtime/shared.py), compiled code
    computes each: both count what ran, so the model FLOPs compare like with like only without sharing."""

    def shared_modules(self, model: torch.nn.Module) -> list[list[torch.nn.Module]]:
        return []


def _inputs(cfg_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples, or one sample as a CFG batch (equal latents, the class and the null class): CFG-Cache skips
    its unconditional half at some steps, so the calls alternate between two shapes."""
    g = torch.Generator().manual_seed(0)
    if cfg_batch:
        x = torch.randn(1, 4, 8, 8, generator=g)
        return torch.cat([x, x]), torch.tensor([1, 1000])
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])


def _recording() -> tuple[list[torch.fx.GraphModule], object]:
    """A fresh dynamo and a backend that only records the graphs it is given."""
    torch._dynamo.reset()
    counters.clear()
    graphs: list[torch.fx.GraphModule] = []
    return graphs, recording_backend(graphs)


def _compiled_runs(config: CacheConfig, enable_first: bool, steps: int = STEPS, profile: bool = False
                   ) -> dict[str, object]:
    """The eager run's generation, then three compiled generations of the same inputs, and what they counted;
    ``profile``: the third under torch.profiler, each step's ATen ops run outside the graphs (``outside``)."""
    graphs, backend = _recording()
    # two blocks where the schedule reads the first block's probe (RCS), one where none does
    model = tiny_dit(layers=LAYERS if config.schedule.uses_input else ONE_BLOCK)
    eager_calls = count_eager_calls(model)
    x, y = _inputs(config.cfg_cache is not None)
    relcache.enable(model, config, adapter=_NoSharing())
    eager = run_loop(model, x, y, steps=steps)
    eager_stats = relcache.stats(model)
    if not enable_first:  # enable on the compiled wrapper instead
        relcache.disable(model)
    compiled = torch.compile(model, backend=_marking(backend) if profile else backend)
    if not enable_first:
        relcache.enable(compiled, config, adapter=_NoSharing())
    outside = None
    try:
        eager_calls.clear()
        first = run_loop(compiled, x, y, steps=steps)
        after_first, first_stats, eager_in_first = len(graphs), relcache.stats(compiled), len(eager_calls)
        eager_calls.clear()
        second = run_loop(compiled, x, y, steps=steps)
        stats, eager_in_second = relcache.stats(compiled), len(eager_calls)
        eager_calls.clear()  # a third: nothing a generation does may make the next one's first call run eagerly
        third, outside = _profiled_loop(compiled, x, y, steps) if profile else (run_loop(compiled, x, y, steps=steps),
                                                                                None)
        third_full = relcache.stats(compiled).full_steps
    finally:
        relcache.disable(compiled)
        torch._dynamo.reset()
    return dict(eager=eager, first=first, second=second, third=third, eager_stats=eager_stats, stats=stats,
                first_stats=first_stats, after_first=after_first, after_later=len(graphs),
                breaks=dict(counters["graph_break"]), eager_in_first=eager_in_first, eager_in_second=eager_in_second,
                eager_in_third=len(eager_calls), third_full=third_full, outside=outside)


#: the name the profiler gives each compiled graph's call (``_marking``)
GRAPH_MARK = "relcache-test-graph"
# ATen ops that run no kernel: views, allocations, a ``.to`` that changes nothing, a host number made a tensor
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "transpose",
              "permute", "detach", "detach_", "alias", "as_strided", "split", "chunk", "unbind", "narrow", "flatten",
              "lift_fresh", "empty", "empty_strided", "empty_like", "to", "resolve_conj", "resolve_neg", "resize_"}


def _marking(backend: Callable) -> Callable:
    """``backend``, each compiled graph's call marked ``GRAPH_MARK`` for the profiler."""

    def marking_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # noqa: ANN202
        run = backend(gm, example_inputs)

        def marked(*args: object) -> object:
            with torch.profiler.record_function(GRAPH_MARK):
                return run(*args)

        return marked

    return marking_backend


def _profiled_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int
                   ) -> tuple[list[torch.Tensor], dict[int, list[str]]]:
    """``run_loop``'s generation, each call under torch.profiler: the outputs, and per step the ATen ops that ran a
    kernel outside the compiled graphs' own calls."""
    outside: dict[int, list[str]] = {}

    @contextlib.contextmanager
    def profiled(i: int) -> Iterator[None]:
        with torch.profiler.profile() as prof:
            yield
        outside[i] = []
        for e in prof.events():
            in_graph, parent = False, e.cpu_parent
            while parent is not None and not in_graph:
                in_graph, parent = parent.name == GRAPH_MARK, parent.cpu_parent
            if e.name.startswith("aten::") and e.name[6:] not in _NO_KERNEL and not in_graph:
                outside[i].append(e.name[6:])

    return run_loop(model, x, y, steps=steps, around=profiled), outside


def _generation_counts(compiled: torch.nn.Module, graphs: list, eager_calls: list[int], x: torch.Tensor,
                       y: torch.Tensor, steps: int, **begin: object) -> tuple[int, int]:
    """One generation after ``begin_generation(compiled, **begin)`` (its ``timesteps`` also drive the loop): how many
    graphs it compiled, and how many calls ran eagerly."""
    relcache.begin_generation(compiled, **begin)
    eager_calls.clear()
    before = len(graphs)
    run_loop(compiled, x, y, steps=steps, begin=False, timesteps=begin.get("timesteps"))
    return len(graphs) - before, len(eager_calls)


#: what a compiled step must not guard on: the step numbers the host keeps per context and per cached module (a guard
#: on one recompiles whenever it moves; torch 2.11 guarded ``slot in caches.last_record``, now
#: ``group.name in record.last_record``, on the value stored there)
STEP_NUMBERS = (".last_record", ".unrecorded", ".host_k", ".full_steps", ".step", ".last_timestep")
T = TypeVar("T")
#: the cases whose guards ``test_a_cached_step_compiles_whole`` reads from dynamo's guard log (the log costs time).
#: The CFG-Cache case stores and reads deltas in compiled calls: the step a delta was stored at was once set inside
#: the compiled call from the context's step, a guard on ``.step`` that recompiled other step counts
GUARDS_READ = ("RFE alone", "RFC target NFC", "TaylorSeer + CFG-Cache on a CFG batch")


def _guard_sources(run: Callable[[], T]) -> tuple[T, list[str]]:
    """``run()``'s result, and the source of every guard dynamo logged while it ran (its guards artifact)."""
    sources: list[str] = []

    class Sources(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sources.extend(part.split(",")[0] for part in record.getMessage().split("source=")[1:])

    handler = Sources()
    guards_log = logging.getLogger("torch._dynamo.guards.__guards")
    torch._logging.set_logs(guards=True)
    guards_log.addHandler(handler)
    try:
        return run(), sources
    finally:
        guards_log.removeHandler(handler)
        torch._logging.set_logs()


def _check_guard_sources(sources: list[str]) -> None:
    """dynamo's guards of every graph: none reads a step number of relcache's, and none diffusers' registry wrapper."""
    # the host's objects, and each cached module's slot (its caches, reached from its hook: ``modules.ModuleSlot``)
    host = [s for s in sources if s.startswith("L['host']") or ".forward.__self__.slot" in s]
    assert any(".slot.record.states" in s for s in host), sources[:20]  # the log was read: the caches are guarded
    assert not [s for s in host if any(s.endswith(n) or n + "[" in s for n in STEP_NUMBERS)], sorted(set(host))
    # a cached module calls its hook directly (``attachment.DirectHook``): nothing of diffusers' registry wrapper (a
    # partial over a closure over the hook's function reference) is guarded, only the hook's bound method
    assert any(s.endswith(".forward.__self__.slot") for s in sources), sorted(set(sources))[:40]
    assert not [s for s in sources if ".forward.func" in s and "_modules" in s], sorted(set(sources))


def _check_kernels_outside(config: CacheConfig, outside: dict[int, list[str]], full_steps: list[int]) -> None:
    """Under torch.compile every step of a later generation, its first included (the first generation ran it eagerly
    to reserve the caches, then compiled), runs its tensor work inside the graphs: relcache's per-step host work
    launches no kernel, which on a GPU would be a launch outside any capture.
    * Interval: the one op outside is the step's rows written into their static buffer (docs/spec.md §Capture), on a
      GPU an asynchronous host-to-device copy rather than a kernel.
    * RCS traces its pre-pass (the forward up to the first cached module) and the input error's arithmetic into its
      first graph: outside, a cached step runs two copies into static buffers (its forecast row, then its step rows)
      around the one host read; a full step adds the update of the probe's divided differences (subtractions,
      divisions, and their copies). Before, the pre-pass and the error ran eagerly: about 30 and 20 kernels per step
      on DiT-S."""
    assert 1 < len(full_steps) < STEPS, full_steps  # full and cached steps
    if not config.schedule.uses_input:
        assert outside == {i: ["copy_"] for i in range(STEPS)}, outside
        return
    for i in range(STEPS):
        if i in full_steps:
            assert set(outside[i]) <= {"copy_", "sub", "div"} and len(outside[i]) <= 12, (i, outside[i])
        else:
            assert outside[i] == ["copy_", "copy_"], (i, outside[i])


#: compiled over two generations by tests/runtime/test_capture.py's ``test_compiled_steps_meet_what_cuda_graph_capture_
#: checks`` (compiled, then enabled, with the default adapter), which checks there what this test would check of them
#: but the FLOP counts, a third generation and this order (enable, then compile), which the other cases check
#: (dynamo's tracing is most of the suite's time)
IN_CAPTURE_TESTS = ("RFC threshold", "RFC+ fit with calibrated steps",
                    "TaylorSeer + CFG-Cache(align=False) on a CFG batch", "FasterCache on a CFG batch")
#: enabled on the compiled wrapper: FORA here; test_capture.py's four (RCS among them) are enabled so too
CASES = [(n, True) for n in CONFIGS if n not in IN_CAPTURE_TESTS] + [("FORA", False)]
#: the cases whose third generation is profiled for the ops that run outside the graphs (``_check_kernels_outside``)
KERNELS_COUNTED = ("FORA", "TaylorSeer", "RFE alone", "RFC target NFC")


@pytest.mark.parametrize(("name", "enable_first"), CASES,
                         ids=[f"{n}-{'enable-then-compile' if e else 'compile-then-enable'}" for n, e in CASES])
def test_a_cached_step_compiles_whole(name, enable_first):
    profile = enable_first and name in KERNELS_COUNTED
    if enable_first and name in GUARDS_READ:
        r, sources = _guard_sources(lambda: _compiled_runs(CONFIGS[name], enable_first, profile=profile))
        _check_guard_sources(sources)
    else:
        r = _compiled_runs(CONFIGS[name], enable_first, profile=profile)
    # the step hook's skipped frame, and nothing inside an Interval step breaks; an RCS step breaks once more, where
    # the host reads its decision (``StepCalls.settle``) between its pre-pass's graph and the forward's
    rcs = CONFIGS[name].schedule.uses_input
    where = {("settle" if "StepCalls.settle" in b else "step" if "StepHook._step" in b else b) for b in r["breaks"]}
    assert where == ({"step", "settle"} if rcs else {"step"}), r["breaks"]
    # each kind of step compiles once: a few graphs in the first generation, none in the second (RCS: also the
    # pre-pass's, one per order of its forecast, and the compiled first call's own pre-pass under its own frame)
    assert 2 <= r["after_first"] <= (13 if rcs else 8) and r["after_later"] == r["after_first"], (
        r["after_first"], r["after_later"])
    # the first generation runs its first call eagerly once (on a CFG batch whose unconditional half is skipped,
    # the half-batch call's first too: its shapes are new), the second generation only where shapes are new to it
    half = r["eager_stats"].uncond_skipped > 0
    assert r["eager_in_first"] == (2 if half else 1) and r["eager_in_second"] == r["eager_in_third"] == (
        1 if half else 0), (r["eager_in_first"], r["eager_in_second"], r["eager_in_third"])
    assert r["first_stats"].full_steps == r["eager_stats"].full_steps
    assert r["first_stats"].flops_fraction == pytest.approx(r["eager_stats"].flops_fraction)
    for a, b, c, d in zip(r["eager"], r["first"], r["second"], r["third"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d, a, rtol=1e-5, atol=1e-6)
    eager, compiled = r["eager_stats"], r["stats"]
    assert compiled.full_steps == r["third_full"] == eager.full_steps and 2 < eager.nfc < STEPS
    if profile:
        _check_kernels_outside(CONFIGS[name], r["outside"], r["third_full"])
    cfg = CONFIGS[name].cfg_cache  # aligned, full steps 0, 1, 4, 7 and window 4..9: 4 stores the delta, 7 skips
    expected = 0 if cfg is None else len(cfg.skipped_steps(STEPS, eager.full_steps))
    assert compiled.uncond_skipped == eager.uncond_skipped == expected
    # aligned, RFC(threshold=0.4)'s full steps in the window are refreshes, so it skips none (the method alone)
    aligned = 0 if name.startswith("RFC") else 1
    assert expected == (0 if cfg is None else aligned if cfg.align else 4)
    assert compiled.flops_fraction == pytest.approx(eager.flops_fraction)
    assert compiled.model_flops_fraction == pytest.approx(eager.model_flops_fraction)


def test_fastercache_over_fifty_steps_stays_within_the_recompile_limit():
    """50 steps of FasterCache on a CFG batch: 9 half-batch steps whose rebuild weights change with the phase (and
    compound): the weights are tensors, so the kinds of step stay few and nothing falls back to eager."""
    config = dataclasses.replace(FasterCache(warmup=16), cfg_cache=CFGCache(compound=True, skip_full=True))
    r = _compiled_runs(config, True, steps=50)
    assert r["after_first"] <= 8 and r["after_later"] == r["after_first"]
    # aligned: the full attention steps 21, 25, 27, ..., 47 that no refresh step reaches skip the unconditional half
    assert r["stats"].uncond_skipped == r["eager_stats"].uncond_skipped == 9
    for a, c in zip(r["eager"], r["second"], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    assert r["stats"].model_flops_fraction == pytest.approx(r["eager_stats"].model_flops_fraction)


def _held_in_buffers(model: torch.nn.Module) -> tuple[int, int]:
    """How many stored differences of the model's predictor states are held in its static buffers, and how many
    out of place."""
    session = _session(model)
    buffers = {id(b) for b in session.static.buffers.values()}
    held = [id(d) in buffers for ctx in session.contexts.values() for record in ctx.caches.records.values()
            for states in record.states.values() for st in states for d in st.out.diffs]
    return sum(held), len(held) - sum(held)


def test_a_first_call_of_another_dtype_runs_eagerly_again():
    """A rehearsed first call's graph and the buffers its records write into were made for one dtype: after
    ``model.double()`` the next generation's first call runs eagerly again (its buffers are made there, so every
    cache stays in place) and is rehearsed anew; the generation after replays that graph."""
    graphs, backend = _recording()
    model = tiny_dit(layers=ONE_BLOCK)
    eager_calls = count_eager_calls(model)
    x, y = _inputs(False)
    relcache.enable(model, TaylorSeer(3), adapter=_NoSharing())
    compiled = torch.compile(model, backend=backend)
    counts = []
    try:
        for dtype in (torch.float32, torch.float32, torch.float64, torch.float64):
            model.to(dtype)
            eager_calls.clear()
            run_loop(compiled, x.to(dtype), y, steps=6)
            counts.append((len(eager_calls), _held_in_buffers(model)))
    finally:
        relcache.disable(compiled)
        torch._dynamo.reset()
    assert [n for n, _ in counts] == [1, 0, 1, 0], counts
    assert all(out_of_place == 0 and held > 0 for _, (held, out_of_place) in counts), counts


def test_a_rehearsal_leaves_the_budget_the_previous_generations_contexts():
    """Under ``max_cache_bytes`` a context's storage counts the previous generation's contexts not yet running. A
    rehearsal forgets the running generation so far, not the previous one: with two contexts per step ("default",
    "default.2") and a new batch size in the third generation, every generation chooses the storages it chooses
    without rehearsals, as the eager run does (a compiled run without rehearsals chose the same: checked by hand)."""
    g = torch.Generator().manual_seed(0)
    small, large = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])), (
        torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 7, 3, 4]))

    def storages(compile_it: bool) -> list[dict[str, str]]:
        graphs, backend = _recording()
        model = tiny_dit(layers=ONE_BLOCK)
        relcache.enable(model, dataclasses.replace(FORA(3), max_cache_bytes=24576), adapter=_NoSharing())
        session = _session(model)
        compiled = torch.compile(model, backend=backend) if compile_it else model
        chosen = []
        try:
            for x, y in (small, small, large, large):
                relcache.begin_generation(compiled, 4)
                with torch.no_grad():
                    for i in range(4):
                        t = torch.full((x.shape[0],), 999 - 200 * i)
                        a = compiled(x, timestep=t, class_labels=y).sample
                        b = compiled(x, timestep=t, class_labels=y).sample  # the same step's second call
                        x = x - 0.05 * (a + b)
                chosen.append({n: ctx.storage.label if ctx.storage else "as computed"
                               for n, ctx in session.contexts.items()})
        finally:
            relcache.disable(compiled)
            torch._dynamo.reset()
        assert bool(graphs) == compile_it
        return chosen

    with_rehearsals = storages(True)
    assert with_rehearsals == storages(False)
    assert with_rehearsals[2]["default"] != with_rehearsals[2]["default.2"]  # the budget did choose


def test_record_errors_under_compile_runs_eagerly_and_records_the_same_errors():
    """``record_errors`` reads every forecast's error on the host: under torch.compile such steps run eagerly (no
    graph, no break inside a step) and record what the eager run records."""
    graphs, backend = _recording()
    model = tiny_dit(layers=LAYERS)
    x, y = _inputs(False)
    relcache.enable(model, RFC(threshold=0.3), adapter=_NoSharing(), record_errors=True)
    try:
        eager = run_loop(model, x, y, steps=STEPS)
        eager_errors = relcache.stats(model).contexts["default"].module_errors
        compiled = run_loop(torch.compile(model, backend=backend), x, y, steps=STEPS)
        stats = relcache.stats(model)
    finally:
        relcache.disable(model)
        torch._dynamo.reset()
    assert not graphs and set(counters["graph_break"]) <= {b for b in counters["graph_break"] if "StepHook" in b}
    assert stats.contexts["default"].module_errors == eager_errors and any(eager_errors.values())
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _limit_hits() -> tuple[list[str], logging.Handler]:
    """dynamo's log lines saying a frame reached its recompile limit, and the handler collecting them."""
    hits: list[str] = []

    class _Hits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage():
                hits.append(record.getMessage())

    return hits, _Hits()


def test_each_enabled_model_compiles_within_its_own_recompile_limit():
    """dynamo counts graphs against its recompile limit (8) per code object. Three enabled models of one class, each
    needing a few kinds of step, would share one limit and run the overflow eagerly; each has its own entry frame, so
    none falls back and a second round compiles nothing."""
    graphs, backend = _recording()
    limit_hits, handler = _limit_hits()
    logging.getLogger("torch._dynamo").addHandler(handler)
    models = [torch.compile(tiny_dit(seed=i, layers=ONE_BLOCK), backend=backend) for i in range(3)]
    x, y = _inputs(False)
    try:
        for m in models:
            relcache.enable(m, TaylorSeer(3))
        for m in models:
            run_loop(m, x, y, steps=STEPS)
        first = len(graphs)
        for m in models:
            run_loop(m, x, y, steps=STEPS)
        fractions = [relcache.stats(m).flops_fraction for m in models]
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        for m in models:
            relcache.disable(m)
        torch._dynamo.reset()
    assert not limit_hits, limit_hits
    assert first > 8 and len(graphs) == first  # more graphs than one limit allows, none after the first round
    assert all(f == pytest.approx(fractions[0]) for f in fractions)


@pytest.mark.parametrize("name", ["TaylorSeer", "TaylorSeer + CFG-Cache(align=False) on a CFG batch"])
def test_other_batch_sizes_and_guidance_off_stay_within_the_recompile_limit(name):
    """Batch 2, 4, 2, 4 and, on a CFG batch, guidance off and on again: every kind of call has an entry frame of its
    own, so none passes dynamo's recompile limit. Before, one frame per model took the graphs of every shape and row
    group: past 8 the rest ran eagerly in every later generation (6 of 10 steps of each batch-4 generation, 8 of 10 of
    each generation without guidance). Only a switch's first call runs eagerly (its buffers are made anew)."""
    config = CONFIGS[name]
    cfg = config.cfg_cache is not None
    graphs, backend = _recording()
    hits, handler = _limit_hits()
    logging.getLogger("torch._dynamo").addHandler(handler)
    model = tiny_dit(layers=ONE_BLOCK)
    eager_calls = count_eager_calls(model)
    relcache.enable(model, config, adapter=_NoSharing())
    compiled = torch.compile(model, backend=backend)
    runs = [(2, True), (4, True), (2, True), (4, True)] if not cfg else [(2, True), (2, False), (2, True), (2, False)]
    counts = []
    try:
        for batch, guidance in runs:
            g = torch.Generator().manual_seed(batch)
            x = torch.randn(batch // 2 if cfg else batch, 4, 8, 8, generator=g)
            x, y = (torch.cat([x, x]), torch.tensor([1, 1000])) if cfg else (x, torch.arange(batch) % 10)
            counts.append(_generation_counts(compiled, graphs, eager_calls, x, y, STEPS, num_steps=STEPS,
                                             guidance=guidance))
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        relcache.disable(compiled)
        torch._dynamo.reset()
    assert not hits, hits
    assert sum(n for n, _ in counts[:2]) > 8, counts  # more graphs than one frame's limit allows
    assert [n for n, _ in counts[2:]] == [0, 0], counts  # later generations compile nothing ...
    assert all(e <= 2 for _, e in counts[2:]), counts  # ... and run no step eagerly but a switch's first calls


def test_a_generation_under_inference_mode_leaves_buffers_a_later_one_can_write():
    """The static buffers outlive the generation: made inside ``torch.inference_mode()`` they were inference tensors,
    and every later generation outside that mode (a pipeline's own ``no_grad``) raised "Inplace update to inference
    tensor outside InferenceMode" until ``disable``. Outputs equal eager relcache's over the same sequence."""
    x, y = _inputs(False)

    def sequence(model: torch.nn.Module) -> list[torch.Tensor]:
        outs = []
        for mode in (torch.inference_mode, torch.no_grad):
            with mode():
                outs.append(run_loop(model, x, y, steps=5)[-1].clone())
        return outs

    model = tiny_dit(layers=ONE_BLOCK)
    relcache.enable(model, TaylorSeer(2), adapter=_NoSharing())
    eager = sequence(model)
    relcache.disable(model)
    _, backend = _recording()
    model = tiny_dit(layers=ONE_BLOCK)
    relcache.enable(model, TaylorSeer(2), adapter=_NoSharing())
    compiled = torch.compile(model, backend=backend)
    try:
        outs = sequence(compiled)
    finally:
        relcache.disable(compiled)
        torch._dynamo.reset()
    for got, want in zip(outs, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.compiler.disable
def _host_side(*args: object) -> None:
    """A user's compiler-disabled hook: a graph break inside the model's forward."""


def test_a_graph_break_inside_the_model_counts_each_module_once():
    """After a graph break inside a block (a user's compiler-disabled hook), the rest of the forward runs eagerly
    within a compiled call: its modules counted themselves and the call's end counted them again (FORA: FLOP
    fraction 0.333 against eager's 0.400). The stats equal the eager run's."""
    x, y = _inputs(False)

    def stats(compile_it: bool) -> tuple[list[int], float, float, float]:
        _, backend = _recording()
        model = tiny_dit(layers=LAYERS)
        model.transformer_blocks[1].norm3.register_forward_pre_hook(_host_side)
        relcache.enable(model, FORA(3), adapter=_NoSharing())
        run = torch.compile(model, backend=backend) if compile_it else model
        try:
            run_loop(run, x, y, steps=STEPS)
            st = relcache.stats(run)
        finally:
            relcache.disable(run)
            torch._dynamo.reset()
        return st.full_steps, st.flops_fraction, st.contexts["default"].full_flops, st.model_flops_fraction

    eager, compiled = stats(False), stats(True)
    assert compiled[0] == eager[0]
    assert compiled[1:] == pytest.approx(eager[1:], rel=1e-9)


def test_fullgraph_compile_fails_with_relcaches_reason():
    """``fullgraph=True`` cannot hold relcache's host-side step hook; dynamo's error said "Remove the
    torch.compiler.disable call" and nothing of why (found by review): it gives relcache's reason now."""
    from relcache.runtime.hooks import FULLGRAPH_REASON

    model = tiny_dit(layers=1)
    relcache.enable(model, FORA())
    torch._dynamo.reset()
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported) as got:
            torch.compile(model, backend="eager", fullgraph=True)(
                torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 2]))
        assert FULLGRAPH_REASON in str(got.value)
    finally:
        relcache.disable(model)
        torch._dynamo.reset()


def test_dynamo_skips_the_step_hooks_frame_without_calling_back(monkeypatch):
    """The step hook's frame, disabled non-recursively, is skipped by dynamo in C (``hooks._skip_frame_in_c``): its
    frame callback, which ran in Python at every call (0.34-0.36 ms of a tiny compiled step), no longer sees it, and
    the frames it calls still compile. In a later generation the callback sees no frame at all. Counted by spying on
    the check dynamo's callback makes of every frame it is given (a private function: where torch has no such
    function, there is nothing to count)."""
    import torch._dynamo.convert_frame as convert_frame

    original = getattr(convert_frame, "first_real_inst_idx", None)
    if original is None:  # pragma: no cover - other torch versions
        pytest.skip("this torch's dynamo has no first_real_inst_idx to count its callback's frames with")
    seen: list[str] = []

    def spy(code: object) -> int:
        seen.append(code.co_name)
        return original(code)

    monkeypatch.setattr(convert_frame, "first_real_inst_idx", spy)
    graphs, backend = _recording()
    model = tiny_dit(layers=ONE_BLOCK)
    x, y = _inputs(False)
    relcache.enable(model, FORA(3))
    try:
        compiled = torch.compile(model, backend=backend)
        run_loop(compiled, x, y, steps=6)
        assert any(name.startswith("relcache_step_") for name in seen), seen  # the spy sees the callback's frames
        assert "_step" not in seen
        seen.clear()
        run_loop(compiled, x, y, steps=6)
        assert graphs and seen == []  # a later generation: no frame of the step reaches dynamo's Python callback
    finally:
        relcache.disable(model)
        torch._dynamo.reset()


def test_batch_modulation_with_other_step_counts_stays_within_the_recompile_limit():
    """Batch modulation's table holds a row per step and is read in the graph: each step count now gets entry frames
    of its own (``StepCalls.call_kind``). Before, 10, 14, 20 and 25 steps recompiled under the same frames until
    dynamo's limit, and from then on steps of those counts ran eagerly in every generation."""
    graphs, backend = _recording()
    hits, handler = _limit_hits()
    logging.getLogger("torch._dynamo").addHandler(handler)
    model = tiny_dit(layers=ONE_BLOCK)
    eager_calls = count_eager_calls(model)
    relcache.enable(model, TaylorSeer(3), batch_modulation=True)
    compiled = torch.compile(model, backend=backend)
    x, y = _inputs(False)
    counts = []
    try:
        for steps in (10, 14, 20, 14, 20, 10):  # three counts: more graphs than one frame's limit of 8
            timesteps = [999 - i * (999 // steps) for i in range(steps)]
            counts.append(_generation_counts(compiled, graphs, eager_calls, x, y, steps, timesteps=timesteps))
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        relcache.disable(compiled)
        torch._dynamo.reset()
    assert not hits, hits
    assert sum(n for n, _ in counts[:3]) > 8, counts  # more graphs than one frame's limit allows
    assert counts[3:] == [(0, 0)] * 3, counts  # a step count seen before: nothing compiled, nothing eager


def test_regional_compile_compiles_the_blocks_and_counts_their_flops():
    """``compile_repeated_blocks`` with relcache enabled first (FLOPs counted, the default). relcache measures FLOPs
    under a dispatch mode at a new call signature's first call, where dynamo refuses to compile and marks the code it
    met skipped for good: the blocks were never compiled in that process. They now run eagerly while a call is
    measured, and compile afterwards. The modules inside compiled blocks count nothing themselves; the call's end
    counts them as whole-model compile does: the same FLOP fractions as eager (they were 0.2 against 0.4)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from families import flux_kwargs, flux_pipe
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def generate(pipe):
        out = pipe(**flux_kwargs(), num_inference_steps=10, generator=torch.manual_seed(0), output_type="pt").images
        return out, relcache.stats(pipe)

    torch._dynamo.reset()
    pipe = flux_pipe()
    relcache.enable(pipe, TaylorSeer(3))
    try:
        want, eager = generate(pipe)
        relcache.disable(pipe)
        relcache.enable(pipe, TaylorSeer(3))
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
        got, regional = generate(pipe)
        compiled = {c.__name__: len(_debug_get_cache_entry_list(c.forward.__code__))
                    for c in (FluxTransformerBlock, FluxSingleTransformerBlock)}
    finally:
        relcache.disable(pipe)
        torch._dynamo.reset()
    assert all(n > 0 for n in compiled.values()), compiled
    assert regional.full_steps == eager.full_steps == [0, 1, 4, 7]
    assert regional.flops_fraction == pytest.approx(eager.flops_fraction) and eager.flops_fraction == pytest.approx(0.4)
    assert regional.model_flops_fraction == pytest.approx(eager.model_flops_fraction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _autograd_nodes(tensors: list[torch.Tensor]) -> int:
    """How many autograd nodes the history of ``tensors`` holds."""
    seen, stack = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [f for f, _ in node.next_functions]
    return len(seen)


def test_a_compiled_loop_with_autograd_on_keeps_no_history_across_generations():
    """A hand-written loop without ``torch.no_grad()``: the static buffers, which outlive the generation, took the
    autograd history of every value written into them, chained write after write (about 40 more nodes per
    generation, saved activations included), and buffers needing a gradient made the second generation recompile.
    A generation's end now detaches them in place: the history stays one generation's, later generations compile
    nothing."""
    graphs, backend = _recording()
    model = tiny_dit(layers=ONE_BLOCK)
    relcache.enable(model, TaylorSeer(3))
    compiled = torch.compile(model, backend=backend)
    x, y = _inputs(False)
    counts, nodes = [], []
    try:
        for _ in range(4):
            before = len(graphs)
            relcache.begin_generation(compiled, STEPS)
            xx = x
            for i in range(STEPS):  # autograd on
                out = compiled(xx, timestep=torch.full((2,), 999 - 99 * i), class_labels=y).sample
                xx = (xx - 0.05 * out).detach()
            assert out.requires_grad  # autograd did record
            counts.append(len(graphs) - before)
            nodes.append(_autograd_nodes(list(_session(compiled).static.buffers.values())))
    finally:
        relcache.disable(compiled)
        torch._dynamo.reset()
    assert counts[0] > 0 and counts[1:] == [0, 0, 0], counts
    assert nodes[1] == nodes[2] == nodes[3], nodes
