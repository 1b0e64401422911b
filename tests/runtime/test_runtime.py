"""relcache.enable/disable/stats on diffusers' DiT, through DiTPipeline and through hand-written loops."""

import math

import pytest
import torch
from conftest import run_loop, tiny_dit
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import relcache
from relcache import (
    FORA,
    RFC,
    AlreadyEnabledError,
    CacheConfig,
    CFGCache,
    ConfigError,
    Interval,
    Linear,
    NotEnabledError,
    Relational,
    Reuse,
    Taylor,
    TaylorSeer,
    UnsupportedModelError,
)

EXACT_PRESETS = [
    FORA(1, 1), TaylorSeer(1, 2, 1), RFC(threshold=0.0), RFC(target_nfc=12), CacheConfig(Relational(2), Interval(1, 1)),
    CacheConfig(Linear(0.5), Interval(1, 2)), CacheConfig(Taylor(3), Interval(1, 3)),
]


def _inputs(batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.arange(batch) % 10


@pytest.mark.parametrize("config", EXACT_PRESETS, ids=lambda c: c.label)
def test_every_step_full_equals_uncached(dit, config):
    x, y = _inputs()
    ref = run_loop(dit, x, y)
    with relcache.cached(dit, config):
        out = run_loop(dit, x, y)
        assert relcache.stats(dit).nfc == 12
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pipeline_end_to_end_exact_and_counted(pipe):
    labels = [1, 7]
    ref = pipe(labels, num_inference_steps=20, guidance_scale=1.5, generator=torch.manual_seed(0), output_type="np")
    relcache.enable(pipe, FORA(interval=1))
    out = pipe(labels, num_inference_steps=20, guidance_scale=1.5, generator=torch.manual_seed(0), output_type="np")
    relcache.disable(pipe)
    assert (out.images == ref.images).all()

    relcache.enable(pipe, TaylorSeer(interval=4))
    cached = pipe(labels, num_inference_steps=20, guidance_scale=1.5, generator=torch.manual_seed(0), output_type="np")
    st = relcache.stats(pipe)
    assert st.num_steps == 20 and st.full_steps == [0, 1, 5, 9, 13, 17] and st.nfc == 6
    assert st.flops_fraction == pytest.approx(6 / 20)
    assert list(st.contexts) == ["default"]
    assert abs(cached.images - ref.images).max() > 0 and (cached.images >= 0).all()  # predicted, finite
    relcache.disable(pipe)


def test_pipeline_target_nfc_and_state_reset(pipe):
    relcache.enable(pipe, RFC(target_nfc=7))
    kw = dict(num_inference_steps=25, guidance_scale=1.5, output_type="np")
    a = pipe([3, 4], generator=torch.manual_seed(1), **kw).images
    assert relcache.stats(pipe).nfc == 7
    b = pipe([3, 4], generator=torch.manual_seed(1), **kw).images
    assert (a == b).all()  # identical calls: state was reset
    c = pipe([3, 4, 5], generator=torch.manual_seed(1), **kw).images  # batch change between calls
    assert c.shape[0] == 3 and relcache.stats(pipe).nfc == 7
    with pytest.raises(ConfigError, match=r"target_nfc must be <= the number of steps \(5\)"):
        pipe([3], num_inference_steps=5, guidance_scale=1.5, output_type="np")
    relcache.disable(pipe)
    after = pipe([3, 4], generator=torch.manual_seed(1), **kw).images  # usable and uncached after the error
    relcache.enable(pipe, FORA(1))
    full = pipe([3, 4], generator=torch.manual_seed(1), **kw).images
    relcache.disable(pipe)
    assert (after == full).all()


def test_bare_loop_new_generation_detected_from_timesteps(dit):
    x, y = _inputs()
    relcache.enable(dit, RFC(threshold=0.2))
    first = run_loop(dit, x, y, begin=False)
    second = run_loop(dit, x, y, begin=False)
    st = relcache.stats(dit)
    relcache.disable(dit)
    assert st.num_steps == 12 and 2 <= st.nfc < 12
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_resolution_and_batch_change_between_calls(dit):
    relcache.enable(dit, TaylorSeer(3))
    small = run_loop(dit, *_inputs(batch=2, size=8))
    large = run_loop(dit, *_inputs(batch=3, size=12))
    relcache.disable(dit)
    ref = run_loop(dit, *_inputs(batch=3, size=12))
    assert small[-1].shape == (2, 4, 8, 8) and large[-1].shape == (3, 4, 12, 12)
    torch.testing.assert_close(large[0], ref[0])  # first steps are full
    assert torch.isfinite(large[-1]).all()


def test_split_cfg_contexts_keep_separate_state(dit):
    """cond and uncond as separate calls, each in its own diffusers cache context."""
    x, y = _inputs()
    null = torch.full_like(y, 999)

    def loop():
        relcache.begin_generation(dit, 10)
        outs = []
        with torch.no_grad():
            for i in range(10):
                t = torch.full((2,), 900 - 90 * i)
                for name, lab in (("cond", y), ("uncond", null)):
                    _set_cache_context(dit, CacheContext(name))
                    outs.append(dit(x + 0.1 * i, timestep=t, class_labels=lab).sample)
                _set_cache_context(dit, None)
        return outs

    ref = loop()
    relcache.enable(dit, FORA(1))
    exact = loop()
    relcache.disable(dit)
    for a, b in zip(exact, ref, strict=True):
        torch.testing.assert_close(a, b)
    relcache.enable(dit, FORA(3))
    loop()
    st = relcache.stats(dit)
    relcache.disable(dit)
    assert set(st.contexts) == {"cond", "uncond"}
    assert st.contexts["cond"].full_steps == st.contexts["uncond"].full_steps == [0, 1, 4, 7]
    assert st.nfc == 4 and st.full_steps == [0, 1, 4, 7]


def test_cfg_halves_never_share_norms(dit):
    """With CFG batched, each half of the batch is predicted exactly as if it ran alone."""
    x, y = _inputs(batch=2)
    with relcache.cached(dit, RFC(threshold=10.0, max_skip=3)):  # fixed schedule: full every 4th step
        both = run_loop(dit, torch.cat([x, x]), torch.cat([y, torch.full_like(y, 999)]))
        alone = run_loop(dit, x, y)
    # the schedule's error is a batch mean, but with max_skip the full steps are the same
    torch.testing.assert_close(both[-1][:2], alone[-1], rtol=1e-4, atol=1e-5)


def test_flops_are_measured_per_module(dit):
    """Every step full: the executed FLOPs of each kind of module are its hand-counted FLOPs at every step."""
    x, y = _inputs(batch=2)
    B, L, d, steps = 2, 16, 32, 12
    ff = 2 * B * L * d * 4 * d * 2  # two matmuls d->4d->d
    attn = 4 * 2 * B * L * d * d + 2 * 2 * B * L * L * d  # q, k, v, out projections plus QK^T and AV
    for kind, flops in (("mlp", ff), ("attn", attn)):
        relcache.enable(dit, CacheConfig(Reuse(), Interval(1, 1), modules=(kind,)))
        run_loop(dit, x, y, steps=steps)
        st = relcache.stats(dit)
        relcache.disable(dit)
        assert st.contexts["default"].executed_flops == st.contexts["default"].full_flops == steps * 3 * flops


def test_cache_bytes_counted_by_hand(dit):
    x, y = _inputs(batch=2)
    tensor = 2 * 16 * 32 * 4  # one float32 (B, L, d) tensor: every cached module's input and output
    modules = 6  # 3 blocks x (attn1, ff)
    expected = {
        # order 2 after 12 steps: D_0, D_1, D_2 of every module's output
        "taylor": modules * 3 * tensor,
        # Relational adds the input at the last full step and one ratio s per sample (float32)
        "relational": modules * (4 * tensor + 2 * 4),
        # RFC (every step full at tau = 0) adds RCS's D_0..D_2 of the first module's input
        "rfc": modules * (4 * tensor + 2 * 4) + 3 * tensor,
        # bfloat16 caches halve the stored outputs and inputs; the ratio stays float32
        "taylor bf16": modules * 3 * tensor // 2,
    }
    configs = {
        "taylor": TaylorSeer(2, 2), "relational": CacheConfig(Relational(2), Interval(2, 2)),
        "rfc": RFC(threshold=0.0), "taylor bf16": CacheConfig(Taylor(2), Interval(2, 2), cache_dtype=torch.bfloat16),
    }
    for name, config in configs.items():
        relcache.enable(dit, config)
        run_loop(dit, x, y)
        held = relcache.stats(dit).cache_bytes
        relcache.disable(dit)
        assert held == expected[name], name


def test_record_errors_only_at_cached_steps(dit):
    x, y = _inputs()
    relcache.enable(dit, TaylorSeer(4), record_errors=True)
    run_loop(dit, x, y)
    st = relcache.stats(dit)
    relcache.disable(dit)
    errs = st.contexts["default"].module_errors
    assert len(errs) == 6  # 3 blocks x (attn1, ff)
    cached_steps = sorted(set(range(12)) - set(st.full_steps))
    assert sorted(errs["transformer_blocks.0.attn1"]) == cached_steps
    assert all(e > 0 for per in errs.values() for e in per.values())


def test_bad_input_errors_and_model_left_usable(dit):
    x, y = _inputs()
    ref = run_loop(dit, x, y)
    attrs = {name: set(vars(m)) for name, m in dit.named_modules()}
    relcache.enable(dit, FORA(2))
    with pytest.raises(AlreadyEnabledError, match="already enabled"):
        relcache.enable(dit, FORA(2))
    run_loop(dit, x, y)
    assert relcache.stats(dit).nfc == 7  # still cached as configured
    relcache.disable(dit)
    with pytest.raises(NotEnabledError, match="not enabled"):
        relcache.disable(dit)
    with pytest.raises(NotEnabledError):
        relcache.stats(dit)
    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel"):
        relcache.enable(torch.nn.Linear(2, 2), FORA())
    with pytest.raises(ConfigError, match="config must be a relcache.CacheConfig"):
        relcache.enable(dit, "fora")
    with pytest.raises(UnsupportedModelError, match=r"got object\. Supported models: .*DiTTransformer2DModel"):
        relcache.enable(object(), FORA())  # an UnsupportedModelError is a TypeError, as this was before

    class UNetPipeline:  # SD 1.5, SDXL, DDPM: no .transformer; the error used to list nothing and name no way on
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match=r"UNet pipeline.*Supported models: .*relcache\.CustomAdapter"):
        relcache.enable(UNetPipeline(), FORA())
    relcache.enable(dit, RFC(target_nfc=10))
    calls = []
    handle = dit.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ConfigError, match=r"target_nfc must be <= the number of steps \(6\), got 10"):
        run_loop(dit, x, y, steps=6)
    assert calls == []  # refused by begin_generation, before the loop's first call
    handle.remove()
    for bad in (0, 2.5, True, "12", torch.tensor(2.0)):
        with pytest.raises(ConfigError, match=r"num_steps must be an integer >= 1, got "):
            relcache.begin_generation(dit, bad)
    relcache.begin_generation(dit, torch.tensor(12))  # an integer tensor, e.g. from len(timesteps) arithmetic
    run_loop(dit, x, y, begin=False)
    assert relcache.stats(dit).nfc == 10
    relcache.disable(dit)
    assert {name: set(vars(m)) for name, m in dit.named_modules()} == attrs
    for a, b in zip(run_loop(dit, x, y), ref, strict=True):
        assert torch.equal(a, b)


def test_enable_failure_rolls_back(dit):
    """A hook that cannot be registered midway (a registry already holding relcache's hook name on block 1's ff)
    makes enable fail, and every hook registered before it is removed again."""
    from diffusers.hooks import HookRegistry, ModelHook

    squatter = HookRegistry.check_if_exists_or_initialize(dit.transformer_blocks[1].ff)
    squatter.register_hook(ModelHook(), "relcache_module")
    attrs = {name: set(vars(m)) for name, m in dit.named_modules()}
    with pytest.raises(ValueError, match="already exists"):
        relcache.enable(dit, FORA())
    assert not relcache.is_enabled(dit)
    assert {name: set(vars(m)) for name, m in dit.named_modules()} == attrs
    assert list(squatter.hooks) == ["relcache_module"]  # the other hook stays


def test_module_kinds_restrict_caching():
    model = tiny_dit()
    relcache.enable(model, CacheConfig(Taylor(1), Interval(3), modules=("attn",)))
    assert list(relcache.stats(model).modules.values()) == ["attn"] * 3
    relcache.disable(model)
    with pytest.raises(ConfigError, match="modules must be a non-empty subset"):
        CacheConfig(Taylor(1), Interval(3), modules=("conv",))


def test_cfg_delta_is_usable_only_for_the_shape_it_was_stored_for():
    """``CFGState.usable``: a stored CFG-Cache delta serves only a conditional half of the shape it was taken from;
    none stored serves nothing."""
    from relcache.runtime.cfg import CFGState

    state = CFGState()
    assert not state.usable((1, 4, 8, 8))
    cond, uncond = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    state.store(CFGCache(), uncond, cond, (1, 4, 8, 8))
    state.settle(3)
    assert state.usable((1, 4, 8, 8)) and state.refreshed == 3 and not state.stored
    state.settle(4)  # nothing stored since: the refresh step stays
    assert state.refreshed == 3
    for other in ((1, 4, 12, 12), (2, 4, 8, 8), (1, 4, 8)):
        assert not state.usable(other), other


def test_cfg_cache_never_rebuilds_from_a_delta_of_another_resolution(dit):
    """A CFG batch whose resolution changes within a generation (8x8 latents up to step 5, 12x12 from step 6): the
    step after the change, where the schedule would skip, runs both halves (its output is the model's, exactly) and
    stores a delta of the new shape; the 8x8 delta is never applied to a 12x12 half. With every module step full,
    the paper schedule (window 1..9, refresh at 1, 4, 7) then skips at 2, 3, 5, 8, 9, and step 8 rebuilds its
    unconditional half from step 7's delta (weights 1.1, 1.1: step 8 < 0.9 * 10 and >= 0.7 * 10)."""
    steps = 10
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 12, 12, generator=g)
    y = torch.tensor([3, 999])  # cond first (DiT), then the null class

    def loop():
        outs = []
        with torch.no_grad():
            for i in range(steps):
                x = (small if i < 6 else large) * (1 + 0.05 * i)
                outs.append(dit(torch.cat([x, x]), timestep=torch.full((2,), 999 - 99 * i), class_labels=y).sample)
        return outs

    ref = loop()
    cfg_cache = CFGCache(interval=3, window_steps=(1, steps), align=False)
    with relcache.cached(dit, CacheConfig(Reuse(), Interval(1, 1), cfg_cache=cfg_cache)):
        relcache.begin_generation(dit, steps)
        got = loop()
        st = relcache.stats(dit)
    assert st.contexts["default"].uncond_skipped_steps == [2, 3, 5, 8, 9]
    for i in (0, 1, 4, 6, 7):  # both halves ran: the model's output
        torch.testing.assert_close(got[i], ref[i], rtol=0, atol=0)
    for i in (2, 3, 5, 8, 9):  # the conditional half ran
        torch.testing.assert_close(got[i][:1], ref[i][:1], rtol=1e-5, atol=1e-6)
    rebuilt = cfg_cache.rebuild(ref[8][:1], *cfg_cache.deltas(ref[7][1:], ref[7][:1]), 1.1, 1.1)
    torch.testing.assert_close(got[8][1:], rebuilt, rtol=1e-5, atol=1e-5)


def _signed_zero(step: int, num_steps: int | None) -> float:
    """0.0 at even steps, -0.0 at odd ones: equal numbers, different bits."""
    return -0.0 if step % 2 else 0.0


@pytest.mark.parametrize(("config", "tables"),
                         [(TaylorSeer(3, 2), 4), (CacheConfig(Linear("rising"), Interval(3, 2)), 9),
                          (CacheConfig(Linear(_signed_zero), Interval(3, 2)), 7)],
                         ids=["Taylor", "Linear (rows depend on the step)", "Linear, signed zeros"])
def test_each_steps_rows_are_its_own_though_their_host_tensors_are_made_once(config, tables):
    """A step's rows are built from a host tensor kept per table (building one from nested lists was most of a
    compiled cached step's bookkeeping). Each step must still get its own numbers: ``predictor.row`` of each module's
    ``k`` at that step (FasterCache's weight changes at every step), and the kept tensors must not be written into."""
    from relcache.api import _session

    model = tiny_dit()
    x, y = _inputs()
    relcache.enable(model, config)
    steps, seen = 9, []
    try:
        relcache.begin_generation(model, steps)
        with torch.no_grad():
            for i in range(steps):
                model(x, timestep=torch.full((2,), 999 - 100 * i), class_labels=y)
                caches = _session(model).contexts["default"].caches
                ks = caches.host_k["all"]
                expected = torch.tensor([config.predictor.row(int(k), i, steps) for k in ks])
                torch.testing.assert_close(caches.rows["all"], expected, rtol=0, atol=0)
                assert torch.equal(caches.rows["all"].signbit(), expected.signbit())  # -0.0 is not 0.0 here
                assert caches.rows["all"].data_ptr() not in {t.data_ptr() for t in caches.host_rows.values()}
                seen.append(expected)
        made = len(caches.host_rows)
    finally:
        relcache.disable(model)
    # one host tensor per distinct table, none twice: Taylor's k is 0, 1, 2 or 3 at every step (full: 0, 1, 4, 7)
    assert made == len({tuple(float(v).hex() for v in t.flatten().tolist()) for t in seen}) == tables


def test_a_diffusers_cache_on_the_transformer_is_refused_either_way():
    """Found by a careful-user review: relcache enabled over diffusers' FirstBlockCache, or that cache turned on after
    ``enable``, ran both caches (an output neither method gives) with stats that did not count the other's skips."""
    from diffusers import FirstBlockCacheConfig
    from families import flux_kwargs, flux_pipe

    pipe = flux_pipe()
    transformer = pipe.transformer

    def generate() -> None:
        pipe(**flux_kwargs(), num_inference_steps=3, output_type="latent")

    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(AlreadyEnabledError, match=r"cache \(FirstBlockCacheConfig\) is enabled on the transformer "
                                                  r"\(FluxTransformer2DModel\): .*transformer\.disable_cache"):
        relcache.enable(pipe, FORA(2))
    transformer.disable_cache()
    relcache.enable(pipe, FORA(2))  # nothing was left attached by the refusal
    try:
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))  # diffusers does not know of relcache
        with pytest.raises(AlreadyEnabledError,
                           match=r"was enabled on the transformer \(FluxTransformer2DModel\) after relcache\.enable"):
            generate()
        transformer.disable_cache()
        generate()
        st = relcache.stats(pipe)
        assert st.num_steps == 3 and st.full_steps == [0, 1]  # step 2 cached, by relcache alone
    finally:
        relcache.disable(pipe)


def test_stats_before_any_step_say_why_the_flops_are_unknown(dit):
    """Found by review: right after ``enable``, and after a generation's first call raised, every FLOP field is NaN
    while ``flops_unknown`` was None, which the spec reserves for counted FLOPs."""
    x, y = _inputs()
    with relcache.cached(dit, FORA(2)):
        st = relcache.stats(dit)
        assert math.isnan(st.flops_fraction) and st.flops_unknown == "no step has run yet"
        assert "FLOPs: unknown (no step has run yet)" in str(st)
        run_loop(dit, x, y, steps=4)
        st = relcache.stats(dit)
        assert st.flops_unknown is None and 0 < st.flops_fraction < 1
        relcache.begin_generation(dit, 4)
        with pytest.raises(RuntimeError), torch.no_grad():  # a first call that raises: nothing was counted
            dit(x, timestep=torch.full((2,), 999), class_labels=torch.tensor([1, 2, 3]))
        st = relcache.stats(dit)
        assert math.isnan(st.flops_fraction) and st.flops_unknown == "no step has completed yet"
