"""Cache memory: stored formats end to end, the peak and per-kind bytes in stats, and ``max_cache_bytes``."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import dit_pipe, run_loop, tiny_dit
from families import CASES, generate_with_stats
from torch._subclasses.fake_tensor import FakeTensor

import relcache
from relcache import FORA, RFC, CacheStorage, CFGCache, ConfigError, TaylorSeer
from relcache.methods.config import STORAGE_LADDER
from relcache.methods.storage import Held
from relcache.runtime.context import ModuleCaches

F8 = torch.float8_e4m3fn


def _loop(config, model=None, steps=8):
    model = model if model is not None else tiny_dit()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    relcache.enable(model, config)
    try:
        outs = run_loop(model, x, y, steps=steps)
        return outs, relcache.stats(model)
    finally:
        relcache.disable(model)


def test_float16_cache_with_outputs_past_float16_range_stays_finite():
    """Issue 16 item 4, end to end: module outputs past 65504 held in a float16 cache made every cached step inf/NaN.
    Scaled, the float16-cache run matches the float32-cache run to float16's rounding."""
    def loud() -> torch.nn.Module:
        model = tiny_dit()
        with torch.no_grad():
            for block in model.transformer_blocks:
                block.attn1.to_out[0].weight.mul_(1e5)  # attention outputs up to about 1.2e5
        return model

    ref, _ = _loop(FORA(2), loud())
    got, st = _loop(dataclasses.replace(FORA(2), cache_dtype=torch.float16), loud())
    assert st.nfc < 8
    for a, b in zip(ref, got, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)


def test_float8_and_int4_caches_run_and_hold_less():
    base, st0 = _loop(RFC(threshold=0.3))
    outs, st1 = _loop(dataclasses.replace(RFC(threshold=0.3), cache_dtype=CacheStorage(F8, "int4", F8)))
    assert st1.full_steps == st0.full_steps  # the schedule's input history is held as computed
    assert st1.peak_cache_bytes < st0.peak_cache_bytes / 3
    assert all(torch.isfinite(o).all() for o in outs)
    assert st1.contexts["default"].cache_storage.startswith("base float8_e4m3fn, diffs int4")


def test_stats_report_the_peak_and_bytes_per_kind():
    _, st = _loop(TaylorSeer(2, 2))
    states = sum(st.peak_cache_bytes_by_kind.values())
    # DiT: 3 blocks x (attn1, ff), each output (2, 16, 32) float32 x 3 differences once the history is full
    assert st.peak_cache_bytes_by_kind == {"attn": 3 * 3 * 2 * 16 * 32 * 4, "mlp": 3 * 3 * 2 * 16 * 32 * 4}
    assert st.peak_cache_bytes == states == st.cache_bytes  # a bare loop: nothing freed yet


def test_the_peak_is_summed_only_where_something_may_have_been_recorded(monkeypatch):
    """Summing every state's bytes at every call cost 40-80 µs a call at DiT-XL/2's depth, host time a compiled
    cached step waits on. It is summed at full steps and at a cached step where a module computed (shapes new to its
    state): here step 5 is a cached step on 4x the tokens, whose records are the peak, and step 6 the first size
    again."""
    sums = []
    real = ModuleCaches.nbytes.fget
    monkeypatch.setattr(ModuleCaches, "nbytes", property(lambda self: sums.append(1) or real(self)))
    model = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    relcache.enable(model, FORA(3))
    try:
        with torch.no_grad():
            relcache.begin_generation(model, 8)
            for i in range(8):
                xi = torch.randn(2, 4, 16, 16, generator=g) if i == 5 else x
                model(xi, timestep=torch.full((2,), 999 - 100 * i), class_labels=y)
        calls = len(sums)
        st = relcache.stats(model)
    finally:
        relcache.disable(model)
    ctx = st.contexts["default"]
    assert ctx.full_steps == [0, 1, 4, 7]
    assert calls == 6  # the four full steps and cached steps 5 and 6; not steps 2 and 3
    # 3 blocks x (attn1, ff), one output each (FORA) of (2, 64, 32) float32 at step 5, (2, 16, 32) after it
    assert ctx.peak_cache_bytes == 6 * 2 * 64 * 32 * 4
    assert st.cache_bytes == 6 * 2 * 16 * 32 * 4


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_budget_estimate_is_exact_and_picks_the_most_precise_storage_that_fits(family):
    """The bytes computed from a fake-tensor run before any module runs equal what the caches then hold: a budget of
    exactly the measured peak keeps the computed dtype, one byte less moves to the next storage (within budget).
    Wan splits CFG into two call contexts: from the second generation on, the first context counts the second (which
    then takes what fits in the rest)."""
    case = CASES[family]
    cfg = RFC(threshold=0.0)  # every step full: the histories fill up
    pipe = case.build()
    relcache.enable(pipe, cfg)
    _, plain = generate_with_stats(pipe, case, steps=5)
    relcache.disable(pipe)
    peak = plain.peak_cache_bytes
    relcache.enable(pipe, dataclasses.replace(cfg, cache_dtype=STORAGE_LADDER[-1]))  # the last rung: int8 and int4
    _, smallest = generate_with_stats(pipe, case, steps=5)
    relcache.disable(pipe)
    least = smallest.peak_cache_bytes
    assert least < peak / 2  # float32 as computed against 8 and 4 bits (with their scales, large on tiny models)
    cases = [(peak, STORAGE_LADDER[0]), (peak - 1, STORAGE_LADDER[1])]
    if family == "flux":  # one call context (Wan's first generation would not know of its second context yet)
        cases.append((least, STORAGE_LADDER[-1]))
    for budget, storage in cases:
        relcache.enable(pipe, dataclasses.replace(cfg, max_cache_bytes=budget))
        generate_with_stats(pipe, case, steps=5)
        _, st = generate_with_stats(pipe, case, steps=5)
        relcache.disable(pipe)
        label = "as computed" if storage is None else storage.label
        assert next(iter(st.contexts.values())).cache_storage == label, (budget, peak)
        assert st.peak_cache_bytes <= budget


def test_a_budget_nothing_fits_fails_before_any_module_runs():
    model = tiny_dit()
    ran = []  # real computations only: the budget's shape run is on fake tensors
    model.transformer_blocks[0].attn1.register_forward_hook(
        lambda m, i, out: ran.append(1) if not isinstance(out, FakeTensor) else None)
    with pytest.raises(ConfigError, match="max_cache_bytes=1000 is too small"):
        _loop(dataclasses.replace(RFC(threshold=0.3), max_cache_bytes=1000), model)
    assert ran == []


def test_a_forward_that_reads_a_value_is_refused_a_budget_with_the_way_out():
    """A forward that reads a tensor's value (diffusers' ulysses_anything reads the slices' sizes) cannot run on the
    fake tensors the budget is sized from: it raised DataDependentOutputException from deep inside (review)."""
    model = tiny_dit()

    def reads(module: torch.nn.Module, args: tuple) -> None:
        args[0].sum().item()

    model.transformer_blocks[0].register_forward_pre_hook(reads)
    with pytest.raises(ConfigError, match=r"cannot run so \(DataDependentOutputException.*give cache_dtype=\.\.\."):
        _loop(dataclasses.replace(FORA(3), max_cache_bytes=10**9), model)
    _loop(dataclasses.replace(FORA(3), cache_dtype=torch.bfloat16), model)  # the way out runs


def test_a_model_cast_after_enable_keeps_within_the_budget():
    """The storage is chosen from the bytes of the dtype the model computes in now: a shapes-only memo kept a bfloat16
    model's choice ("as computed") after ``model.float()``, which then held twice the budget (found by review)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    cfg = RFC(threshold=0.0)  # every step full: the histories fill up
    model = tiny_dit().to(torch.bfloat16)
    relcache.enable(model, cfg)
    run_loop(model, x.bfloat16(), y, steps=8)
    budget = relcache.stats(model).peak_cache_bytes  # what the bfloat16 model holds as computed
    relcache.disable(model)
    relcache.enable(model, dataclasses.replace(cfg, max_cache_bytes=budget))
    try:
        run_loop(model, x.bfloat16(), y, steps=8)
        assert relcache.stats(model).contexts["default"].cache_storage == "as computed"
        model.float()
        run_loop(model, x, y, steps=8)
        stats = relcache.stats(model)
        assert stats.contexts["default"].cache_storage != "as computed"
        assert stats.peak_cache_bytes <= budget
    finally:
        relcache.disable(model)


def test_a_compiled_rfe_keeps_within_the_budget_its_eager_run_fills():
    """Compiled RFE records keep the Gram of the differences (``order²`` numbers per sample and module), which the
    budget left out: at a budget equal to the eager run's caches as computed, the compiled run chose the same storage
    and held more than the budget (found by review). The eager run still gets exactly that budget's storage."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    cfg = RFC(threshold=0.0)  # every step full: the histories fill up
    model = tiny_dit(layers=1)
    relcache.enable(model, cfg)
    run_loop(model, x, y, steps=6)
    budget = relcache.stats(model).peak_cache_bytes
    relcache.disable(model)
    found = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        relcache.enable(model, dataclasses.replace(cfg, max_cache_bytes=budget))
        try:
            run_loop(torch.compile(model, backend="eager") if compiled else model, x, y, steps=6)
            stats = relcache.stats(model)
            found[compiled] = (stats.contexts["default"].cache_storage, stats.peak_cache_bytes)
        finally:
            relcache.disable(model)
            torch._dynamo.reset()
    assert found[False] == ("as computed", budget), found
    assert found[True][1] <= budget and found[True][0] != "as computed", found


def test_a_compiled_rfe_on_a_split_sequence_is_not_charged_a_gram_it_does_not_keep(tmp_path):
    """On a sequence split over processes compiled RFE records keep no Gram, so the budget counts none: it charged one
    and gave the compiled run a coarser storage than its eager run at the same budget (found by review). One gloo
    process with ``sequence_group`` is the split's code path."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    cfg = RFC(threshold=0.0)
    model = tiny_dit(layers=1)
    relcache.enable(model, cfg)
    run_loop(model, x, y, steps=6)
    budget = relcache.stats(model).peak_cache_bytes
    relcache.disable(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        found = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            relcache.enable(model, dataclasses.replace(cfg, max_cache_bytes=budget), sequence_group=dist.group.WORLD)
            try:
                run_loop(torch.compile(model, backend="eager") if compiled else model, x, y, steps=6)
                found[compiled] = relcache.stats(model).contexts["default"].cache_storage
            finally:
                relcache.disable(model)
                torch._dynamo.reset()
    finally:
        dist.destroy_process_group()
    assert found == {False: "as computed", True: "as computed"}, found


def _held_tensors(model) -> list[torch.Tensor]:
    """Every tensor the session's predictor states and RCS's history hold (a scaled one's data)."""
    session = vars(model)["_relcache"]
    held = []
    for ctx in session.contexts.values():
        states = [st for record in ctx.caches.records.values() for group in record.states.values() for st in group]
        hist = getattr(ctx.schedule.memory, "history", None)
        for t in [*(d for st in states for d in (*st.out.diffs, st.inp)), *(hist.diffs if hist else ())]:
            if t is not None:
                held.append(t.data if isinstance(t, Held) else t)
    return held


@pytest.mark.parametrize(("cache_dtype", "mode"), [(None, "no_grad"), (torch.bfloat16, "no_grad"),
                                                   (None, "inference_mode")])
def test_a_cfg_half_is_held_in_a_storage_of_its_own(cache_dtype, mode):
    """CFG-Cache's half-batch rows are views of the whole batch's tensors: held as such, a state kept the whole
    storage alive, up to 1.21x the bytes ``cache_bytes`` reported (found by review)."""
    pipe = dit_pipe()
    views = []

    def check(module, args, out):
        views.extend(t.shape for t in _held_tensors(pipe.transformer)
                     if t.untyped_storage().nbytes() > t.numel() * t.element_size())

    cfg = dataclasses.replace(RFC(threshold=0.3), cfg_cache=CFGCache(skip_full=True), cache_dtype=cache_dtype)
    relcache.enable(pipe, cfg)
    handle = pipe.transformer.register_forward_hook(check)
    try:
        with getattr(torch, mode)():  # a view made under inference mode has no _base, and was held as is (review)
            pipe([1, 7], num_inference_steps=12, guidance_scale=4.0, generator=torch.manual_seed(0), output_type="np")
        assert relcache.stats(pipe).uncond_skipped > 0
    finally:
        handle.remove()
        relcache.disable(pipe)
    assert views == []


def test_scaled_and_packed_storage_compile_whole():
    """Storing with scales and 4-bit packing adds no graph break and no recompilation (test_compile's counting)."""
    from test_compile import _compiled_runs

    r = _compiled_runs(dataclasses.replace(RFC(threshold=0.3), cache_dtype=CacheStorage(F8, "int4", F8)), True)
    assert {"settle" if "StepCalls.settle" in b else "step" if "StepHook._step" in b else b for b in r["breaks"]} == {
        "step", "settle"}, r["breaks"]  # test_compile: RCS reads its decision between two graphs
    assert 2 <= r["after_first"] <= 12 and r["after_later"] == r["after_first"]
    # compiled arithmetic rounds differently from eager (fused), and where a difference sits on an int4 rounding
    # boundary that moves it one grid step (1/7 of its token's largest): 1.2e-3 on outputs of about 1.6 at two cached
    # steps of the two-block model; the full steps are the same
    for a, b, c in zip(r["eager"], r["first"], r["second"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=3e-3)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=3e-3)
    assert r["stats"].full_steps == r["eager_stats"].full_steps


def test_the_end_of_a_pipeline_call_frees_rcs_input_history_too():
    """After a pipeline call every cached tensor is freed, RCS's probe history included (it stayed held before), while
    the stats keep the peak and the schedule's numbers."""
    from conftest import dit_pipe

    pipe = dit_pipe()
    relcache.enable(pipe, RFC(target_nfc=4))
    try:
        pipe([1, 2], num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
        st = relcache.stats(pipe)
    finally:
        relcache.disable(pipe)
    assert st.cache_bytes == 0 and st.peak_cache_bytes > 0
    assert st.nfc == 4 and st.contexts[next(iter(st.contexts))].input_errors



@pytest.mark.parametrize("storage", [None, CacheStorage(F8, "int4", F8)])
def test_modules_reading_one_tensor_hold_one_stored_input(storage, monkeypatch):
    """FLUX's single blocks run ``proj_mlp`` and ``attn`` on one modulated norm: RFE stores that input once. The output
    is bit-identical to unshared storage, and the peak is lower by exactly one stored input per single block, held
    (and counted) by ``proj_mlp``, the first to store it. ``attn`` also takes ``proj_mlp``'s norm of the input's
    change: one norm fewer per single block at each record from the second on and each forecast after it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from relcache.methods import storage as storage_mod

    case = CASES["flux"]
    cfg = dataclasses.replace(RFC(threshold=0.3), cache_dtype=storage)

    class Norms(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.linalg_vector_norm.default
            return func(*args, **(kwargs or {}))

    def generate():
        pipe = case.build()
        relcache.enable(pipe, cfg)
        try:
            with Norms() as norms:
                got = generate_with_stats(pipe, case, steps=6)
            return *got, norms.n
        finally:
            relcache.disable(pipe)

    shared, st, n = generate()
    monkeypatch.setattr(storage_mod.SharedInputs, "find", lambda self, x, fmt, axes: None)  # never share
    unshared, st0, n0 = generate()
    assert st.full_steps == st0.full_steps and st.nfc < 6
    np.testing.assert_array_equal(shared, unshared)
    second = st.full_steps[1]
    forecasts = sum(step not in st.full_steps for step in range(second, 6))
    assert forecasts > 0 and n0 - n == 2 * (len(st.full_steps) - 1 + forecasts)
    # the attn input of each of the 2 single blocks: batch 1, 6 text + 16 image tokens, hidden 16, float32
    one = 1 * 22 * 16 * 4 if storage is None else 1 * 22 * 16 * 1 + 22 * 4  # float8 values + a float32 scale per token
    ctx, ctx0 = st.contexts["cond"], st0.contexts["cond"]
    for block in ("single_transformer_blocks.0", "single_transformer_blocks.1"):
        assert ctx0.peak_module_bytes[f"{block}.attn"] - ctx.peak_module_bytes[f"{block}.attn"] == one
        assert ctx.peak_module_bytes[f"{block}.proj_mlp"] == ctx0.peak_module_bytes[f"{block}.proj_mlp"]
    assert st0.peak_cache_bytes - st.peak_cache_bytes == 2 * one
    assert st0.peak_cache_bytes_by_kind["attn"] - st.peak_cache_bytes_by_kind["attn"] == 2 * one


@pytest.mark.parametrize("storage", [CacheStorage(), CacheStorage(F8, "int4", F8)])
def test_offloaded_caches_give_the_same_outputs_and_stats(storage, monkeypatch):
    """``CacheStorage(offload=True)`` holds every cached tensor in host memory and copies it back when read, the next
    cached module's copies started one module ahead (``prefetch``). On the CPU the copy back is the host tensor
    itself: the same code path, so outputs and stats must equal those of the same storage held in place."""
    from relcache.methods.predictors import Relational
    from relcache.methods.storage import Held

    cfg = RFC(threshold=0.3)
    ref, st0 = _loop(dataclasses.replace(cfg, cache_dtype=storage))
    reads = {"prefetched": 0, "direct": 0}
    device_data, forecast, forecasting = Held._device_data, Relational.forecast, []

    def counting(self):
        if self.device is not None and forecasting:
            reads["prefetched" if self.ready is not None else "direct"] += 1
        return device_data(self)

    def flagged(self, *args, **kwargs):
        forecasting.append(1)
        try:
            return forecast(self, *args, **kwargs)
        finally:
            forecasting.pop()

    monkeypatch.setattr(Held, "_device_data", counting)
    monkeypatch.setattr(Relational, "forecast", flagged)
    outs, st1 = _loop(dataclasses.replace(cfg, cache_dtype=dataclasses.replace(storage, offload=True)))
    for a, b in zip(ref, outs, strict=True):
        assert torch.equal(a, b)
    assert st1.full_steps == st0.full_steps and st0.nfc < 8
    assert (st1.peak_cache_bytes, st1.peak_cache_bytes_by_kind) == (st0.peak_cache_bytes, st0.peak_cache_bytes_by_kind)
    assert st1.contexts["default"].cache_storage.endswith("offloaded to host memory")
    # in a cached step, the first of the 6 cached modules reads its tensors directly, and the 5 others find them
    # prefetched by the module before them (all 6 hold histories of the same order)
    assert reads["direct"] > 0 and reads["prefetched"] == 5 * reads["direct"]


F64_TENSOR = 2 * 16 * 32 * 8  # one float64 (B, L, d) tensor: every cached module's input and output


def _fit(**kw):
    from relcache.methods.fit import InputFit

    return InputFit(2, **kw)


def _plus():
    from relcache.methods.plus import RelationalPlus

    return RelationalPlus(2)


@pytest.mark.parametrize(("make", "expected"), [
    # D_0..D_2 of the output, the input, and the ratio s: one float64 per sample (8 bytes, not float32's 4)
    (lambda: relcache.Relational(2), 3 * F64_TENSOR + F64_TENSOR + 2 * 8),
    # Relational's, plus s(b) and the trend line's A, B, lo, hi: 5 more float64 per sample
    (_plus, 3 * F64_TENSOR + F64_TENSOR + 2 * 8 + 5 * 2 * 8),
    # O(a), 2 output moves, 2 input moves, I(a); per sample the inverse and G_out / s² (2x2, the rows' float64), the
    # two float64 Grams (2x2) and the ratio (float64)
    (lambda: _fit(scale=True), 3 * F64_TENSOR + 3 * F64_TENSOR + 2 * 2 * 4 * 8 + 2 * 2 * 4 * 8 + 2 * 8),
    # without ``scale`` the inverse alone in the rows' dtype
    (_fit, 3 * F64_TENSOR + 3 * F64_TENSOR + 1 * 2 * 4 * 8 + 2 * 2 * 4 * 8 + 2 * 8),
], ids=["Relational", "RelationalPlus", "InputFit scale", "InputFit"])
def test_float64_state_bytes_count_float64_ratios_and_match_what_a_run_holds(make, expected):
    """A float64 model's per-sample numbers (RFE's ratio, RFE+'s trend, the fit's matrices) are float64: 8 bytes each.
    ``state_bytes`` (what a budget is sized from) gives the hand count, and every cached module of a float64 run whose
    histories are full (every step full, order 2) holds exactly that."""
    pred = make()
    assert pred.state_bytes((2, 16, 32), (2, 16, 32), torch.float64, None) == expected
    model = tiny_dit().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([1, 7])
    relcache.enable(model, relcache.CacheConfig(pred, relcache.Interval(1, 1)))
    try:
        run_loop(model, x, y, steps=5)
        st = relcache.stats(model)
        records = vars(model)["_relcache"].contexts["default"].caches.records.values()
        states = [s for record in records for group in record.states.values() for s in group]
    finally:
        relcache.disable(model)
    assert len(states) == 6 and all(s.ratio.dtype == torch.float64 for s in states)
    assert [s.nbytes for s in states] == [expected] * 6
    assert st.contexts["default"].peak_module_bytes == dict.fromkeys(st.modules, expected)
    assert st.cache_bytes == 6 * expected


def test_a_float64_budget_counts_the_float64_ratios():
    """``max_cache_bytes`` on a float64 model: a budget of exactly what RFC's caches hold as computed (6 modules' RFE
    states, float64 ratios included, plus RCS's D_0..D_2 of the probe) keeps them as computed; one byte less does
    not fit, so the next storage is used, within the budget."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([1, 7])
    cfg = RFC(threshold=0.0)  # every step full: the histories fill up
    held = 6 * (4 * F64_TENSOR + 2 * 8) + 3 * F64_TENSOR
    model = tiny_dit().double()
    found = {}
    for budget in (held, held - 1):
        relcache.enable(model, dataclasses.replace(cfg, max_cache_bytes=budget))
        try:
            run_loop(model, x, y, steps=5)
            st = relcache.stats(model)
        finally:
            relcache.disable(model)
        found[budget] = (st.contexts["default"].cache_storage, st.peak_cache_bytes)
    assert found[held] == ("as computed", held)
    assert found[held - 1][0] != "as computed" and found[held - 1][1] <= held - 1


def test_a_predictor_that_keeps_its_caches_as_computed_is_refused_for_that_need():
    """``RFCPlus(fit=True)`` (InputFit) has no smaller storage: a budget below its need named the int8 storage, which
    it cannot use, and gave the as-computed bytes as that storage's (found by review). It now says the caches are kept
    as computed, with their need; a budget above it runs as computed."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    config = relcache.RFCPlus(threshold=0.3, fit=True)
    model = tiny_dit()
    with relcache.cached(model, config):
        run_loop(model, x, y)
        need = relcache.stats(model).peak_cache_bytes
    with relcache.cached(model, dataclasses.replace(config, max_cache_bytes=need)):
        run_loop(model, x, y)
        assert relcache.stats(model).contexts["default"].cache_storage == "as computed"
    with relcache.cached(model, dataclasses.replace(config, max_cache_bytes=need - 1)):
        with pytest.raises(ConfigError, match=rf"InputFit keeps its caches as computed, which needs {need} bytes"):
            run_loop(model, x, y)
