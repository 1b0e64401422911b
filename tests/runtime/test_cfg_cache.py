"""FasterCache and CFG-Cache (docs/spec.md, §CFG-Cache) against hand-computed values.

CFG batched through DiTPipeline (conditional half first) and hand-written loops, CFG split into "cond"/"uncond"
calls with diffusers' cache contexts, and CFG-Cache combined with module caches (FasterCache's Linear, RFC).
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import relcache
from relcache import FORA, RFC, CacheConfig, CFGCache, ConfigError, FasterCache, Interval, Linear, TaylorSeer
from relcache.models.dit import DiTAdapter
from relcache.runtime import flop_counter


@pytest.fixture(autouse=True)
def _every_embedding_copy_computed(monkeypatch):
    """The FLOP counts here are hand-counted with every block's embedding computed: no shared copies
    (relcache.runtime.shared; their FLOP accounting is tested in test_shared.py)."""
    monkeypatch.setattr(DiTAdapter, "shared_modules", lambda self, model: [])

STEPS = 20
NULL = 1000  # DiTPipeline's null class


# -- the method: band split, rebuild, schedule, validation -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 3, 10, 7), (1, 3, 4, 6, 6)], ids=["image", "BCFHW", "BFCHW"])
def test_band_split_reconstructs_its_input(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cfg = CFGCache()
    lf, hf = cfg.split(x)
    back = torch.fft.ifft2(torch.fft.ifftshift(lf + hf, dim=(-2, -1))).real
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    zero = torch.zeros_like(lf)
    torch.testing.assert_close(cfg.rebuild(x, zero, zero, 1.0, 1.0), x, rtol=0, atol=1e-5)
    # per image and per frame: splitting one frame alone gives that frame's bands
    lf0, _ = cfg.split(x[(0,) * (x.ndim - 2)])
    torch.testing.assert_close(lf[(0,) * (x.ndim - 2)], lf0)


def test_low_band_is_the_centred_disk():
    # 10x10: radius 10 // 5 = 2; points with dy^2 + dx^2 <= 4 around (5, 5): 1 + 4 (dist 1) + 4 (diagonal) + 4 (dist 2)
    mask = CFGCache().low_mask(10, 10)
    assert int(mask.sum()) == 13 and mask[5, 5] and mask[3, 5] and mask[5, 7] and mask[6, 6] and not mask[3, 4]
    assert int(CFGCache(radius=1).low_mask(10, 10).sum()) == 5
    assert int(CFGCache().low_mask(4, 4).sum()) == 1  # radius 4 // 5 = 0: the DC bin only
    # a constant image is all DC (low band); a checkerboard is all Nyquist (high band)
    lf, hf = CFGCache().split(torch.full((1, 1, 8, 8), 3.0))
    assert hf.abs().max() < 1e-5 and abs(float(lf.abs().sum()) - 3.0 * 64) < 1e-3
    checker = (torch.arange(8).view(-1, 1) + torch.arange(8)).remainder(2).float().mul(2).sub(1).view(1, 1, 8, 8)
    lf, hf = CFGCache().split(checker)
    assert lf.abs().max() < 1e-5


def test_rebuild_hand_computed():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 4, 8, 8, generator=g)
    cfg = CFGCache(alpha1=0.0, alpha2=0.0)
    torch.testing.assert_close(cfg.rebuild(cond, *cfg.deltas(cond, cond), 1.0, 1.0), cond, rtol=0, atol=1e-5)
    uncond = torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(cfg.rebuild(cond, *cfg.deltas(uncond, cond), 1.0, 1.0), uncond, rtol=0, atol=1e-5)
    # the difference is a constant (low band only) plus a checkerboard (high band only): each band gets its weight
    checker = (torch.arange(8).view(-1, 1) + torch.arange(8)).remainder(2).float().mul(2).sub(1)
    other = cond - 0.5 + 0.25 * checker
    got = cfg.rebuild(cond, *cfg.deltas(other, cond), 1.1, 1.3)
    torch.testing.assert_close(got, cond - 0.5 * 1.1 + 0.25 * 1.3 * checker, rtol=0, atol=1e-5)


def test_skip_schedule_matches_hand_count():
    # align=False, the paper's schedule: window (0.5, 1.0) of 20 steps = 10..19; uncond runs at 10 and 15
    paper = dict(align=False)
    assert CFGCache(interval=5, window=(0.5, 1.0), **paper).skipped_steps(20) == [11, 12, 13, 14, 16, 17, 18, 19]
    # window_steps [2, 9) with interval 3: uncond runs at 2, 5, 8
    assert CFGCache(interval=3, window_steps=(2, 9), **paper).skipped_steps(10) == [3, 4, 6, 7]
    # the defaults over 50 steps: window 18..49 (0.36 * 50 = 18), uncond at 18, 23, ..., 48 (7 of 32 steps)
    skipped = CFGCache(**paper).skipped_steps(50)
    assert len(skipped) == 25 and skipped[:5] == [19, 20, 21, 22, 24] and 48 not in skipped and 49 in skipped
    assert CFGCache(window=(0.0, 0.0), **paper).skipped_steps(20) == []
    assert CFGCache(interval=1, **paper).skipped_steps(20) == []
    # weights over 10 steps: LF boosted while i < 9, HF once i >= 7
    cfg = CFGCache(alpha1=0.1, alpha2=0.15)
    assert cfg.weights(0, 10) == (1.1, 1.0) and cfg.weights(7, 10) == (1.1, 1.15) and cfg.weights(9, 10) == (1.0, 1.15)


def test_aligned_refreshes_hand_counted():
    """align (default): the uncond half is skipped only at full steps; the first full step at or after each refresh
    step runs it and stores the delta."""
    # window 10..19, refresh steps 10 and 15; full steps of Interval(2, 2) in it: 11 (first delta), 13 (skips: no
    # refresh step since 11), 15 (refresh step 15), 17, 19 (skip)
    cfg = CFGCache(interval=5, window=(0.5, 1.0), skip_full=True)
    assert cfg.skipped_steps(20, Interval(2, 2).full_steps(20)) == [13, 17, 19]
    # every step full: the paper's schedule
    paper = CFGCache(interval=5, window=(0.5, 1.0), align=False).skipped_steps(20)
    assert cfg.skipped_steps(20, list(range(20))) == paper
    # refresh steps 2, 5, 8 in [2, 9); full steps 0, 3, 4, 8: 3 stores, 4 skips, 8 stores (refresh step 8)
    cfg = CFGCache(interval=3, window_steps=(2, 9), skip_full=True)
    assert cfg.skipped_steps(10, [0, 3, 4, 8]) == [4]
    assert [cfg.refresh_due(i, 3, 10) for i in range(10)] == [False] * 5 + [True] * 4 + [False]
    assert cfg.refresh_due(2, None, 10) and not cfg.refresh_due(1, None, 10)
    with pytest.raises(ValueError, match="give full_steps"):
        cfg.skipped_steps(10)


def test_step0_phase_hand_counted():
    """phase="step0" (diffusers): refresh steps are the window's multiples of ``interval``; the step before the
    window stores the delta its first steps rebuild from."""
    cfg = CFGCache(interval=5, window=(0.34, 1.0), phase="step0", align=False)  # window ceil(17.0) = 17..49
    assert cfg.skipped_steps(50) == [i for i in range(17, 50) if i % 5]  # diffusers' skips on 50 DDIM steps
    assert [i for i in range(50) if cfg.stores(i, 50)] == list(range(16, 50))
    small = CFGCache(interval=4, window_steps=(3, 10), phase="step0", align=False)
    assert small.skipped_steps(10) == [3, 5, 6, 7, 9]  # refresh steps 4 and 8
    assert [i for i in range(10) if small.is_refresh(i, 10)] == [4, 8]
    assert [i for i in range(10) if small.stores(i, 10)] == [2, 3, 4, 5, 6, 7, 8, 9]
    # the window's phase (default) counts from its start: refresh steps 3 and 7
    assert dataclasses.replace(small, phase="window").skipped_steps(10) == [4, 5, 6, 8, 9]
    # aligned, step0: a delta from step 2 (before the window) serves until refresh step 4
    aligned = dataclasses.replace(small, align=True, skip_full=True)
    assert [aligned.refresh_due(i, 2, 10) for i in range(10)] == [False] * 4 + [True] * 4 + [True, True]
    assert [aligned.refresh_due(i, 4, 10) for i in range(10)] == [False] * 8 + [True, True]
    assert aligned.refresh_due(3, None, 10) and not aligned.refresh_due(2, None, 10)
    # aligned, deltas come from full steps inside the window: 3 stores, 5 (refresh 4 due), 6 skips, 9 (8 due)
    assert aligned.skipped_steps(10, [0, 1, 2, 3, 5, 6, 9]) == [6]
    assert dataclasses.replace(aligned, skip_full=False).skipped_steps(10, [0, 1, 2, 3, 5, 6, 9]) == []


def test_refresh_full_needs_the_paper_schedule_and_an_interval():
    with pytest.raises(ConfigError, match=r"refresh_full=True needs align=False"):
        CFGCache(refresh_full=True)
    with pytest.raises(ConfigError, match=r"refresh_full must be True \(steps that run both halves are full\)"):
        CFGCache(refresh_full=1, align=False)
    with pytest.raises(ConfigError, match=r"phase must be one of 'window', 'step0'"):
        CFGCache(phase="diffusers")
    with pytest.raises(ConfigError, match=r"needs a schedule that reads no input \(relcache.Interval\).*InputError"):
        dataclasses.replace(RFC(target_nfc=8), cfg_cache=CFGCache(refresh_full=True, align=False))


def test_refresh_full_forces_full_steps_hand_counted(pipe):
    """Every step that runs both halves is full: diffusers' FasterCache computes attention there."""
    config = FasterCache(interval=2, warmup=4, cfg_window=(0.36, 1.0), cfg_phase="step0", cfg_refresh_full=True)
    _, st = _run(pipe, config)
    # window ceil(0.36 * 20) = 8..19, refresh steps 10 and 15, step 7 stores the delta steps 8 and 9 use;
    # Interval(2, 4) is full at 0-3, 5, 7, 9, ...; the steps that run both halves (0-7, 10, 15) are full too
    skipped = [8, 9, 11, 12, 13, 14, 16, 17, 18, 19]
    full = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 15, 17, 19]
    assert st.contexts["default"].uncond_skipped_steps == skipped and st.full_steps == full and st.nfc == 15
    # attention FLOPs: 15 full steps, of which 9, 11, 13, 17, 19 on half the batch
    assert st.flops_fraction == pytest.approx((15 - 5 / 2) / STEPS)
    # without refresh_full only the skips move: Interval's own full steps
    _, st = _run(pipe, FasterCache(interval=2, warmup=4, cfg_window=(0.36, 1.0), cfg_phase="step0",
                                   cfg_refresh_full=False))
    assert st.contexts["default"].uncond_skipped_steps == skipped
    assert st.full_steps == [0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19]


def test_refresh_full_stores_true_deltas(dit):
    """A forced full step computes both halves: the rebuilt half is the conditional one plus a true difference."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    # TaylorSeer(4): full at 0, 1, 5, 9. Window 4..9, refresh (step0) 4 and 8; steps 0-3 run both halves
    cfg = CFGCache(interval=4, window_steps=(4, 10), phase="step0", align=False, refresh_full=True,
                   alpha1=0.0, alpha2=0.0)
    with relcache.cached(dit, dataclasses.replace(TaylorSeer(4), cfg_cache=cfg)):
        outs = _cfg_loop(dit, x, y)
        st = relcache.stats(dit)
    assert st.contexts["default"].uncond_skipped_steps == [5, 6, 7, 9]
    assert st.full_steps == [0, 1, 2, 3, 4, 5, 8, 9]  # 2, 3, 4 and 8 forced
    assert st.flops_fraction == pytest.approx((8 - 2 / 2) / 10)  # 5 and 9 on half the batch
    # the first 5 steps are all full, both halves: full computation
    ref = _cfg_loop(dit, x, y, steps=5)
    for a, b in zip(outs[:5], ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c4, u4 = outs[4].chunk(2)
    c8, u8 = outs[8].chunk(2)
    for i, (ca, ua) in ((5, (c4, u4)), (6, (c4, u4)), (7, (c4, u4)), (9, (c8, u8))):
        c, u = outs[i].chunk(2)
        torch.testing.assert_close(u, c + (ua - ca), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha1=-0.1), r"alpha1 must be a finite number >= 0 .*got -0.1"),
        (dict(alpha2=float("nan")), r"alpha2 must be a finite number >= 0"),
        (dict(radius=0), r"radius must be an integer >= 1, got 0"),
        (dict(window=(0.5, 1.5)), r"window must be a fraction of the steps in \[0, 1\], got 1.5"),
        (dict(window=(0.8, 0.2)), r"window must be \(start, end\) with 0 <= start <= end <= 1"),
        (dict(window_steps=(-1, 5)), r"window_steps must be \(start, end\) step indices with 0 <= start <= end"),
        (dict(window_steps=(0.1, 0.5)), r"window_steps must be \(start, end\) step indices"),
        (dict(interval=0), r"interval must be an integer >= 1, got 0"),
        (dict(interval=2.5), r"interval must be an integer >= 1, got 2.5"),
        (dict(early=1.5), r"early must be a fraction of the steps in \[0, 1\], got 1.5"),
        (dict(cond_first="yes"), r"cond_first must be True, False or None"),
        (dict(align=1), r"align must be True \(refresh at full steps\) or False \(at the refresh steps\), got 1"),
        (dict(skip_full=1), r"skip_full must be True \(aligned: skip the unconditional half at full steps\), False "
                            r"or None \(True only when the module schedule computes every step\), got 1"),
    ],
)
def test_bad_settings_name_parameter_and_allowed_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CFGCache(**kwargs)


def test_window_outside_the_steps_and_bad_field(pipe):
    with pytest.raises(ConfigError, match=r"cfg_cache must be a relcache.CFGCache"):
        CacheConfig(Linear(), Interval(2), cfg_cache=0.1)
    with pytest.raises(ConfigError, match=r"window_steps must lie inside 0..num_steps \(8\), got \(2, 30\)"):
        CFGCache(window_steps=(2, 30)).window_range(8)
    relcache.enable(pipe, dataclasses.replace(FORA(2), cfg_cache=CFGCache(window_steps=(2, 30))))
    with pytest.raises(ConfigError, match=r"window_steps must lie inside 0..num_steps \(8\)"):
        pipe([1], num_inference_steps=8, guidance_scale=2.0, output_type="np")
    relcache.disable(pipe)


def test_fastercache_preset_defaults():
    cfg = FasterCache()
    assert cfg.predictor == Linear("rising") and cfg.schedule == Interval(2, 15) and cfg.modules == ("attn",)
    # diffusers' schedule on a 50-step DDIM sampler: refreshes counted from step 0, attention full wherever both
    # halves run; not aligned (aligned is worse for FasterCache)
    assert cfg.cfg_cache == CFGCache(interval=5, window=(0.34, 1.0), alpha1=0.1, alpha2=0.1, early=0.9, late=0.7,
                                     align=False, phase="step0", refresh_full=True)
    assert FasterCache(cfg_align=True).cfg_cache.align and not FasterCache(cfg_align=True).cfg_cache.refresh_full
    assert CFGCache().align
    with pytest.raises(ConfigError, match="cfg_refresh_full=True needs cfg_align=False"):
        FasterCache(cfg_align=True, cfg_refresh_full=True)
    assert FasterCache(cfg=False).cfg_cache is None and FasterCache(cfg=False).label == "FasterCache(N=2)"
    assert cfg.label == "FasterCache(N=2) + CFG-Cache(n=5)"
    assert dataclasses.replace(RFC(target_nfc=14), cfg_cache=CFGCache()).label == "RFC(NFC=14, m=2) + CFG-Cache(n=5)"
    assert CacheConfig(Linear(), Interval(2), cfg_cache=CFGCache(interval=3)).label == (
        "Linear x Interval + CFG-Cache(n=3)"
    )


# -- through DiTPipeline (CFG batched, conditional half first) ------------------------------------------------------
def _run(pipe, config=None, labels=(1, 7), guidance=1.5, steps=STEPS):
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=torch.manual_seed(0), output_type="np")
    if config is None:
        return pipe(list(labels), **kw).images, None
    with relcache.cached(pipe, config):
        images = pipe(list(labels), **kw).images
        return images, relcache.stats(pipe)


def test_never_skipping_equals_the_plain_run(pipe):
    ref, _ = _run(pipe)
    for cfg in (CFGCache(window=(0.0, 0.0)), CFGCache(window_steps=(5, 5)), CFGCache(interval=1)):
        out, st = _run(pipe, dataclasses.replace(FORA(1, 1), cfg_cache=cfg))
        assert (out == ref).all() and st.uncond_skipped == 0 and st.nfc == STEPS
        assert st.flops_fraction == 1.0 and st.model_flops_fraction == 1.0
    # with a module cache: the per-half predictor states give the same result as whole-batch states
    plain, _ = _run(pipe, TaylorSeer(3))
    out, st = _run(pipe, dataclasses.replace(TaylorSeer(3), cfg_cache=CFGCache(window=(0.0, 0.0))))
    assert (out == plain).all() and st.full_steps == Interval(3, 2).full_steps(STEPS)


def test_guidance_scale_one_leaves_cfg_cache_inert(pipe):
    """No CFG: the batch is two different latents, not a doubled one, so nothing is skipped."""
    plain, plain_st = _run(pipe, TaylorSeer(3), guidance=1.0)
    out, st = _run(pipe, dataclasses.replace(TaylorSeer(3), cfg_cache=CFGCache(window=(0.0, 1.0))), guidance=1.0)
    assert (out == plain).all() and st.uncond_skipped == 0 and st.flops_fraction == plain_st.flops_fraction


@pytest.mark.parametrize("config", [FasterCache(warmup=3), dataclasses.replace(
    FORA(3), cfg_cache=CFGCache(align=False, refresh_full=True))], ids=["FasterCache", "FORA + refresh_full"])
def test_split_cfg_without_guidance_leaves_cfg_cache_inert(config):
    """Wan at guidance 1 makes "cond" calls only: forcing each full for its "uncond" pair, which never came, made
    every step full (NFC 10 of 10 against 6; found by review)."""
    pytest.importorskip("transformers")
    from families import CASES, wan_pipe

    pipe = wan_pipe()
    runs = []
    for cfg in (config, dataclasses.replace(config, cfg_cache=None)):
        kwargs = {**CASES["wan"].kwargs(), "guidance_scale": 1.0}
        with relcache.cached(pipe, cfg):
            out = pipe(**kwargs, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").frames
            runs.append((out, relcache.stats(pipe)))
    (out, st), (plain, plain_st) = runs
    assert list(st.contexts) == ["cond"] and st.full_steps == plain_st.full_steps and st.nfc < 10
    assert (out == plain).all()


def test_split_cfg_aligned_stores_deltas_only_where_both_calls_ran_full(monkeypatch):
    """Aligned CFG-Cache promises true deltas: under split CFG with RCS, "cond" and "uncond" decide apart, and a delta
    was stored at an "uncond" full step whose "cond" call was a forecast (steps 14, 16, 19, 25, 29 of Wan's 30 at
    RFC NFC 12; found by review). Every stored delta now pairs two full calls."""
    pytest.importorskip("transformers")
    from families import wan_kwargs, wan_pipe

    from relcache.runtime import cfg as cfg_runtime

    stored = []
    store = cfg_runtime.CFGState.store

    def logged(self, *args, **kwargs):
        stored.append((self.cond.step, bool(self.cond_progress.full)))
        return store(self, *args, **kwargs)

    monkeypatch.setattr(cfg_runtime.CFGState, "store", logged)
    pipe = wan_pipe()
    config = dataclasses.replace(RFC(target_nfc=12), cfg_cache=CFGCache(skip_full=True))
    with relcache.cached(pipe, config):
        pipe(num_inference_steps=30, generator=torch.Generator().manual_seed(0), output_type="latent", **wan_kwargs())
        contexts = relcache.stats(pipe).contexts
    full = {name: set(c.full_steps) for name, c in contexts.items()}
    assert full["cond"] != full["uncond"]  # the two contexts decide apart here, or the case is vacuous
    assert stored and all(cond_full for _, cond_full in stored), stored
    assert all(step in full["cond"] and step in full["uncond"] for step, _ in stored)


def test_split_cfg_skips_spend_the_uncond_budget_instead_of_moving_it():
    """Under split CFG an RFC budget holds per context; a skipped "uncond" call is neither full nor cached, and
    spends one of that context's full steps, so it runs ``K - skipped`` full steps. It used to spend them later, at
    steps where "cond" was cached: 12 full "uncond" steps at K = 12 beside its skips, and model FLOPs no lower than
    without CFG-Cache (found by review)."""
    pytest.importorskip("transformers")
    from families import wan_kwargs, wan_pipe

    pipe = wan_pipe()
    for k in (12, 16):
        fractions = []
        for cfg in (CFGCache(skip_full=True), None):
            with relcache.cached(pipe, dataclasses.replace(RFC(target_nfc=k), cfg_cache=cfg)):
                pipe(num_inference_steps=30, generator=torch.Generator().manual_seed(0), output_type="latent",
                     **wan_kwargs())
                st = relcache.stats(pipe)
            cond, uncond = st.contexts["cond"], st.contexts["uncond"]
            fractions.append(st.flops_fraction)
            assert len(cond.full_steps) == k
            # every skip before the budget is spent takes one of its K full steps; skips after it need no budget
            # (at K = 16 the last full step's place was taken by a skip at step 27, and step 29 skipped as well)
            full, skips = uncond.full_steps, uncond.uncond_skipped_steps
            assert len(full) + len([s for s in skips if s < full[-1]]) <= k <= len(full) + len(skips)
            assert not set(uncond.full_steps) & set(uncond.uncond_skipped_steps)
            assert (len(uncond.uncond_skipped_steps) > 0) is (cfg is not None)
        assert fractions[0] <= fractions[1] - 3 / 60 + 1e-12, fractions  # at least 3 of the 60 calls' modules fewer


#: the CFG-Cache schedule FasterCache had by default before 2026-12-02 (window from 36 %, refreshes counted from the
#: window's start, no forced full attention), which the hand counts below follow
PAPER_CFG = {"cfg_window": (0.36, 1.0), "cfg_phase": "window", "cfg_refresh_full": False}


def test_fastercache_pipeline_nfc_and_flops_hand_counted(pipe):
    config = FasterCache(interval=2, warmup=4, **PAPER_CFG)
    _, st = _run(pipe, config)
    full = [0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19]  # Interval(2, warmup 4)
    skipped = [9, 10, 11, 12, 14, 15, 16, 17, 19]  # window ceil(0.36 * 20) = 8..19, uncond at 8, 13, 18
    assert st.full_steps == full and st.nfc == 12
    assert st.uncond_skipped == 9 and st.contexts["default"].uncond_skipped_steps == skipped
    # attention FLOPs: a full step counts 1, a full step on half the batch (9, 11, 15, 17, 19) counts 1/2
    assert st.flops_fraction == pytest.approx((12 - 5 / 2) / STEPS)
    # every module computed: the whole transformer runs on half the batch at the 9 skipped steps
    _, st = _run(pipe, dataclasses.replace(FORA(1, 1), cfg_cache=CFGCache(skip_full=True)))
    assert st.nfc == STEPS and st.uncond_skipped == 9
    assert st.flops_fraction == pytest.approx((STEPS - 9 / 2) / STEPS)
    assert st.model_flops_fraction == pytest.approx((STEPS - 9 / 2) / STEPS)
    # FasterCache: the feed-forwards and the rest of the transformer always run, so the model saves less
    _, st = _run(pipe, config)
    assert (12 - 5 / 2) / STEPS < st.model_flops_fraction < (STEPS - 9 / 2) / STEPS
    # aligned: refresh steps 8, 13, 18 move to the full steps 9, 13, 19; the full steps 11, 15, 17 skip
    _, st = _run(pipe, FasterCache(interval=2, warmup=4, cfg_align=True, cfg_window=(0.36, 1.0), cfg_phase="window"))
    assert st.contexts["default"].uncond_skipped_steps == [11, 15, 17]
    assert st.flops_fraction == pytest.approx((12 - 3 / 2) / STEPS)


def test_model_flops_match_an_outer_flop_counter(dit):
    """The whole-transformer FLOPs the stats report are what torch's counter sees around the generation."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    with flop_counter() as plain:
        _cfg_loop(dit, x, y, steps=12)
    with relcache.cached(dit, FasterCache(interval=2, warmup=2, **PAPER_CFG)):
        with flop_counter() as counter:
            _cfg_loop(dit, x, y, steps=12)
        st = relcache.stats(dit).contexts["default"]
    assert st.uncond_skipped_steps == [6, 7, 8, 9, 11]  # window ceil(0.36 * 12) = 5..11, uncond at 5 and 10
    assert st.model_executed_flops == counter.get_total_flops()
    assert st.model_full_flops == plain.get_total_flops()
    assert st.model_flops_fraction == pytest.approx(counter.get_total_flops() / plain.get_total_flops())


def test_aligned_without_skip_full_is_the_method_alone(pipe):
    """align with skip_full=False, and the default (None) with a schedule that caches: both halves run at every step,
    sample for sample the method alone."""
    for method in (RFC(target_nfc=8), TaylorSeer(3)):
        alone, alone_st = _run(pipe, method)
        for cfg in (CFGCache(skip_full=False), CFGCache()):
            out, st = _run(pipe, dataclasses.replace(method, cfg_cache=cfg))
            assert (out == alone).all() and st.uncond_skipped == 0 and st.full_steps == alone_st.full_steps
            assert st.model_flops_fraction == alone_st.model_flops_fraction


def test_default_skip_full_skips_only_where_every_step_is_full(pipe):
    """skip_full=None: CFG-Cache alone (every step full) skips at the full steps as skip_full=True does, sample for
    sample; with a schedule that caches it skips nothing, as skip_full=False."""
    alone = dataclasses.replace(FORA(1, 1), cfg_cache=CFGCache())
    out, st = _run(pipe, alone)
    out_true, st_true = _run(pipe, dataclasses.replace(FORA(1, 1), cfg_cache=CFGCache(skip_full=True)))
    # window ceil(0.36 * 20) = 8..19, refresh steps 8, 13, 18: the 9 other steps of the window skip
    assert st.contexts["default"].uncond_skipped_steps == [9, 10, 11, 12, 14, 15, 16, 17, 19]
    assert (out == out_true).all() and st.uncond_skipped == st_true.uncond_skipped == 9
    assert CFGCache().skipped_steps(STEPS, list(range(STEPS))) == [9, 10, 11, 12, 14, 15, 16, 17, 19]
    assert CFGCache().skipped_steps(STEPS, [0, 1, 4, 8, 13, 16, 18, 19]) == []
    assert CFGCache(skip_full=True).skipped_steps(STEPS, [0, 1, 4, 8, 13, 16, 18, 19]) == [16, 19]


def test_rfc_with_cfg_cache_end_to_end(pipe):
    ref, _ = _run(pipe)
    alone, alone_st = _run(pipe, RFC(target_nfc=8))
    out, st = _run(pipe, dataclasses.replace(RFC(target_nfc=8), cfg_cache=CFGCache(skip_full=True)))
    assert st.nfc == 8 and st.full_steps == alone_st.full_steps == [0, 1, 4, 8, 13, 16, 18, 19]
    # two rebuilt unconditional halves (steps 16 and 19) move the samples little: 0.012 from RFC alone's, which are
    # 0.28 from full computation's (rel L1), and closer to full computation's; the conditional output in place of
    # the rebuild (no guidance at those steps) moved them 0.022, and away from full computation's (0.2824)
    moved = float(np.abs(out - alone).sum() / np.abs(alone).sum())
    assert 0 < moved < 0.02
    assert float(np.abs(out - ref).sum() / np.abs(ref).sum()) <= float(np.abs(alone - ref).sum() / np.abs(ref).sum())
    # RCS decides before the call (a pre-pass) where it matters: window 8..19, refresh steps 8, 13, 18; of the full
    # steps in it, 8, 13 and 18 run both halves, 16 and 19 the conditional half alone; cached steps run both
    aligned = CFGCache(skip_full=True)
    assert st.contexts["default"].uncond_skipped_steps == [16, 19] == aligned.skipped_steps(STEPS, st.full_steps)
    assert out.shape == ref.shape and (out >= 0).all() and (out <= 1).all() and not (out == ref).all()
    errors = st.contexts["default"].input_errors  # RCS measured on the conditional half at every step after warm-up
    assert sorted(errors) == list(range(2, STEPS)) and all(e >= 0 for e in errors.values())
    # the whole batch's, alone: at step 2, before anything differs, the halves' errors are not the batch's
    assert errors[2] != alone_st.contexts["default"].input_errors[2]


# -- hand-written loops: the rebuilt half, the order, split CFG ----------------------------------------------------
def _cfg_loop(model, x, y, order="cond_first", steps=10, g=2.0):
    """A DDIM-like CFG loop with the batch ``[cond; uncond]`` or ``[uncond; cond]``; returns each step's output."""
    relcache.begin_generation(model, steps)
    null = torch.full_like(y, NULL)
    labels = torch.cat([y, null] if order == "cond_first" else [null, y])
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2 * len(y),), 900 - 90 * i)
            out = model(torch.cat([x, x]), timestep=t, class_labels=labels).sample
            outs.append(out)
            c, u = out.chunk(2) if order == "cond_first" else out.chunk(2)[::-1]
            x = x - 0.05 * (u + g * (c - u))
    return outs


def test_batched_skip_rebuilds_uncond_and_keeps_order(dit):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    # uncond at 4, 7; skipped 5, 6, 8, 9
    cfg = CFGCache(interval=3, window_steps=(4, 10), alpha1=0.0, alpha2=0.0, skip_full=True)
    config = dataclasses.replace(FORA(1, 1), cfg_cache=cfg)
    with relcache.cached(dit, config):
        outs = _cfg_loop(dit, x, y)
        st = relcache.stats(dit)
    assert st.contexts["default"].uncond_skipped_steps == [5, 6, 8, 9]
    for i, last in ((5, 4), (6, 4), (8, 7), (9, 7)):  # alpha 0: uncond_i = cond_i + (uncond_a - cond_a)
        c, u = outs[i].chunk(2)
        ca, ua = outs[last].chunk(2)
        torch.testing.assert_close(u, c + (ua - ca), rtol=0, atol=1e-5)
    # the conditional half is the model's output on the conditional inputs alone
    ref = _cfg_loop(dit, x, y, steps=5)
    torch.testing.assert_close(outs[4], ref[4])
    x5 = x
    for o in outs[:5]:
        c, u = o.chunk(2)
        x5 = x5 - 0.05 * (u + 2.0 * (c - u))
    with torch.no_grad():
        alone = dit(x5, timestep=torch.full((2,), 450), class_labels=y).sample
    torch.testing.assert_close(outs[5][:2], alone, rtol=1e-4, atol=1e-5)
    # the unconditional half first, declared: the same generation with its halves swapped
    with relcache.cached(dit, dataclasses.replace(config, cfg_cache=dataclasses.replace(cfg, cond_first=False))):
        swapped = _cfg_loop(dit, x, y, order="uncond_first")
        assert relcache.stats(dit).uncond_skipped == 4
    for a, b in zip(outs, swapped, strict=True):
        torch.testing.assert_close(torch.cat(b.chunk(2)[::-1]), a, rtol=1e-4, atol=1e-5)


def test_module_cache_on_half_batch_steps_stays_per_sample(dit):
    """With a module cache, the conditional half of a CFG-Cache run equals a run of the conditional batch alone
    as long as both see the same inputs: every step before the first skip."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    # refresh step 6; full steps 0, 1, 3, 5, 7, 9. align=False: uncond at 6 (cached, so forecast); skipped 7, 8, 9
    cfg = CFGCache(interval=4, window_steps=(6, 10), align=False)
    with relcache.cached(dit, dataclasses.replace(TaylorSeer(2), cfg_cache=cfg)):
        outs = _cfg_loop(dit, x, y)
        st = relcache.stats(dit)
    with relcache.cached(dit, TaylorSeer(2)):
        ref = _cfg_loop(dit, x, y)
    assert st.full_steps == [0, 1, 3, 5, 7, 9] and st.uncond_skipped == 3
    for a, b in zip(outs[:7], ref[:7], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(o).all() for o in outs)
    # 6 full steps, of which 7 and 9 ran on half the batch
    assert st.flops_fraction == pytest.approx((6 - 2 / 2) / 10)
    # aligned: 6 and 8 are cached (both halves forecast), 7 is full and stores the delta, 9 is full and skips
    aligned_cfg = dataclasses.replace(cfg, align=True, skip_full=True, alpha1=0.0, alpha2=0.0)
    with relcache.cached(dit, dataclasses.replace(TaylorSeer(2), cfg_cache=aligned_cfg)):
        aligned = _cfg_loop(dit, x, y)
        st = relcache.stats(dit)
    assert st.contexts["default"].uncond_skipped_steps == [9]
    for a, b in zip(aligned[:9], ref[:9], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c7, u7 = aligned[7].chunk(2)
    c9, u9 = aligned[9].chunk(2)  # alpha 0: the rebuild is the conditional half plus step 7's true difference
    torch.testing.assert_close(u9, c9 + (u7 - c7), rtol=0, atol=1e-5)
    assert st.flops_fraction == pytest.approx((6 - 1 / 2) / 10)  # 9 ran on half the batch


def _split_loop(model, x, y, steps=10):
    """CFG as separate calls, "cond" then "uncond", inputs independent of the outputs; returns (cond, uncond)."""
    relcache.begin_generation(model, steps)
    conds, unconds = [], []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 900 - 90 * i)
            for name, lab, store in (("cond", y, conds), ("uncond", torch.full_like(y, NULL), unconds)):
                _set_cache_context(model, CacheContext(name))
                store.append(model(x + 0.1 * i, timestep=t, class_labels=lab).sample)
            _set_cache_context(model, None)
    return conds, unconds


def test_split_cfg_skips_the_uncond_call(dit):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    ref_c, ref_u = _split_loop(dit, x, y)
    cfg = CFGCache(interval=4, window_steps=(2, 10), alpha1=0.0, alpha2=0.0, skip_full=True)  # uncond at 0, 1, 2, 6
    calls = []
    handle = dit.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *_: calls.append(1))
    with relcache.cached(dit, dataclasses.replace(FORA(1, 1), cfg_cache=cfg)):
        conds, unconds = _split_loop(dit, x, y)
        st = relcache.stats(dit)
    handle.remove()
    assert len(calls) == 10 + 4  # a skipped uncond call does not run the transformer
    assert st.contexts["uncond"].uncond_skipped_steps == [3, 4, 5, 7, 8, 9] and st.uncond_skipped == 6
    assert st.contexts["cond"].uncond_skipped == 0
    for i in range(10):
        torch.testing.assert_close(conds[i], ref_c[i], rtol=0, atol=0)
        if i in (0, 1, 2, 6):
            torch.testing.assert_close(unconds[i], ref_u[i], rtol=0, atol=0)
        else:
            a = 2 if i < 6 else 6
            torch.testing.assert_close(unconds[i], ref_c[i] + (ref_u[a] - ref_c[a]), rtol=0, atol=1e-5)
    assert st.contexts["uncond"].flops_fraction == pytest.approx(4 / 10)
    assert st.flops_fraction == pytest.approx(14 / 20) and st.model_flops_fraction == pytest.approx(14 / 20)


@pytest.mark.parametrize("compound", [False, True])
def test_weights_fresh_or_compounded(dit, compound):
    """w1 = w2 = 1.5 at every step: the k-th skip after the last full uncond gets 1.5 (fresh) or 1.5^k (compound)."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    ref_c, ref_u = _split_loop(dit, x, y)
    cfg = CFGCache(interval=4, window_steps=(2, 10), alpha1=0.5, alpha2=0.5, early=1.0, late=0.0, compound=compound,
                   skip_full=True)
    with relcache.cached(dit, dataclasses.replace(FORA(1, 1), cfg_cache=cfg)):
        _, unconds = _split_loop(dit, x, y)
    for i, a in ((3, 2), (4, 2), (5, 2), (7, 6), (8, 6), (9, 6)):
        w = 1.5 ** (i - a) if compound else 1.5
        torch.testing.assert_close(unconds[i], ref_c[i] + w * (ref_u[a] - ref_c[a]), rtol=0, atol=1e-5)


def test_guidance_stopping_within_a_generation(dit):
    """A loop that drops CFG after some step (a guidance interval) calls with half the batch: with CFG-Cache such a
    call used to raise; it is now a plain call, exactly the model on that batch under FORA(1, 1)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loop() -> list[torch.Tensor]:
        relcache.begin_generation(dit, 10)
        outs = []
        with torch.no_grad():
            for i in range(10):
                t = torch.full((2 if i < 6 else 1,), 900 - 80 * i)
                if i < 6:  # CFG batched, cond first
                    out = dit(torch.cat([x, x]), timestep=t, class_labels=torch.tensor([3, 1000])).sample
                else:
                    out = dit(x, timestep=t, class_labels=torch.tensor([3])).sample
                outs.append(out)
        return outs

    cfg = CFGCache(interval=3, window_steps=(2, 10), alpha1=0.0, alpha2=0.0, skip_full=True)
    ref = loop()
    with relcache.cached(dit, dataclasses.replace(FORA(1, 1), cfg_cache=cfg)):
        outs = loop()
        stats = relcache.stats(dit)
    assert stats.contexts["default"].uncond_skipped_steps == [3, 4]  # refreshed at 2 and 5; none once CFG stops
    assert all(torch.equal(a, b) for a, b in zip(outs[6:], ref[6:], strict=True))
    with relcache.cached(dit, dataclasses.replace(RFC(target_nfc=5), cfg_cache=cfg)):
        loop()
        assert relcache.stats(dit).nfc == 5
    # half the batch is the conditional half: its module states continue, so after the change a module runs only
    # at the schedule's full steps (FORA(3): 0, 1, 4, 7), not at 6 as well for want of a state
    runs: list[int] = []
    inner = dit.transformer_blocks[0].ff.net[0]  # runs only when the feed-forward is computed, not predicted
    inner.register_forward_hook(lambda *_: runs.append(len(outs_seen)))
    outs_seen: list[int] = []
    dit.register_forward_hook(lambda *_: outs_seen.append(0))
    with relcache.cached(dit, dataclasses.replace(FORA(3), cfg_cache=cfg)):
        loop()
        assert relcache.stats(dit).full_steps == [0, 1, 4, 7]
    assert runs == [0, 1, 4, 7]


def test_a_half_batch_call_cuts_hidreams_llama_embeddings_on_their_batch_axis():
    """HiDreamImagePipeline joins the negative and positive Llama embeddings on dim 1 (layers first): a half-batch
    call cut the latents and kept both halves of those, so the conditional half was computed with the wrong text
    (0.06 off at the first skipped step; found by review)."""
    pytest.importorskip("transformers")
    from families import hidream_pipe, randn

    model = hidream_pipe().transformer
    x, t5, llama, pooled = randn(1, 4, 8, 8, seed=5), randn(2, 8, 8, seed=6), randn(3, 2, 8, 4, seed=8), randn(
        2, 8, seed=10)
    seen = []  # the first Llama layer the forward projects, once a step, as the forward got it
    model.caption_projection[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    layer = model.config.llama_layers[0]
    config = dataclasses.replace(FORA(1, 1), cfg_cache=CFGCache(window_steps=(1, 6), interval=3))
    with relcache.cached(model, config):
        relcache.begin_generation(model, 6)
        with torch.no_grad():
            for i in range(6):
                out = model(hidden_states=torch.cat([x, x]), timesteps=torch.full((2,), 900.0 - 100 * i),
                            encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama, pooled_embeds=pooled,
                            return_dict=False)[0]
                u, c = out.chunk(2)
                x = x - 0.05 * (u + 3 * (c - u))
        skipped = relcache.stats(model).contexts["default"].uncond_skipped_steps
    assert skipped and len(seen) == 6
    for step in skipped:  # the unconditional half first: the conditional rows are the second on dim 1
        assert torch.equal(seen[step], llama[layer, 1:])


# -- arguments and outputs besides the sample -------------------------------------------------------------------------
def _skip_every_step() -> CacheConfig:
    """Every step full, the unconditional half skipped at every step CFG-Cache's interval allows."""
    return dataclasses.replace(FORA(1), cfg_cache=CFGCache(skip_full=True, window=(0.0, 1.0), interval=3))


def test_a_half_batch_step_cuts_the_batch_inside_list_arguments():
    """SD3 ControlNet's pipeline passes ``block_controlnet_hidden_states`` as a list of (2B, N, D) residuals: a
    half-batch step cut the latents but not the list, and SD3 broadcast the half batch against it, giving a (2B)-row
    output twice too large and a conditional half off by 0.25, without an error. Cut, the conditional half is the
    plain model's."""
    from diffusers import SD3Transformer2DModel

    from relcache.runtime.cfg_io import slice_batch

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    text, pooled = torch.randn(2, 6, 16, generator=g), torch.randn(2, 16, generator=g)
    control = [0.1 * torch.randn(1, 16, 16, generator=g).repeat(2, 1, 1) for _ in range(2)]

    def loop() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                          timestep=torch.full((2,), t), block_controlnet_hidden_states=control, return_dict=False)[0]
                    for t in (999.0, 800.0, 600.0, 400.0, 200.0, 50.0)]

    plain = loop()
    with relcache.cached(model, _skip_every_step()):
        relcache.begin_generation(model, 6)
        got = loop()
        skipped = relcache.stats(model).uncond_skipped
    assert skipped == 4  # steps 1, 2, 4 and 5 (interval 3: a full-batch step every third)
    for a, b in zip(plain, got, strict=True):
        assert b.shape == a.shape
        torch.testing.assert_close(b[1], a[1], rtol=0, atol=1e-5)  # SD3 pipelines put the conditional half second
    # lists and tuples of (batch, ...) features; tensors of other first dims, 1-d and 2-d ones in a list (Kandinsky
    # 5's positions, Allegro's per-axis (cos, sin) tables, whose 2 frames matched the batch), and lists under a rotary
    # keyword stay whole
    rope = [torch.arange(2), torch.zeros(2, 4)]
    rotary = ((torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)), [torch.zeros(2, 4, 3)])
    args, kwargs = slice_batch((control, (x, x[:1])), {"pos": rope, "ids": torch.zeros(3, 2), "image_rotary_emb":
                                                      rotary[1], "more": rotary}, 2, slice(0, 1))
    assert [t.shape[0] for t in args[0]] == [1, 1] and isinstance(args[1], tuple)
    assert [t.shape[0] for t in args[1]] == [1, 1] and kwargs["ids"].shape == (3, 2)
    assert kwargs["pos"][0] is rope[0] and kwargs["pos"][1] is rope[1]
    assert kwargs["image_rotary_emb"][0] is rotary[1][0] and kwargs["more"][0] is rotary[0]  # nested: whole


def _calls_with_audio(pipe, batched: bool) -> list[tuple[torch.Tensor, ...]]:
    """Four steps of ``pipe``'s transformer: one CFG batch of two equal latents per step ("cond_uncond"), or split
    "cond" and "uncond" calls."""
    model = pipe.transformer
    x = torch.randn(pipe.shape, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for t in (999.0, 700.0, 400.0, 100.0):
            for ctx in ("cond_uncond",) if batched else ("cond", "uncond"):
                kwargs = pipe.inputs(x, torch.full((1,), t), ctx)
                if batched:  # both halves of every per-sample input, as a pipeline's cat([latents] * 2)
                    kwargs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v
                              for k, v in kwargs.items()}
                with model.cache_context(ctx):
                    outs.append(tuple(model(**kwargs, return_dict=False)))
    return outs


@pytest.mark.parametrize(("family", "batched"), [("ltx2", True), ("kandinsky6", False)])
def test_a_model_with_outputs_besides_the_sample_runs_the_method_alone_with_a_warning(family, batched):
    """LTX-2 returns (video, audio) and Kandinsky 6 its audio too: CFG-Cache rebuilt only the sample's unconditional
    half, so LTX-2's audio came back with the conditional half's rows only (its pipeline's ``chunk(2)`` then fails)
    and Kandinsky 6's skipped "uncond" call returned the "cond" call's audio (audio guidance silently gone). Such a
    model now runs the method without CFG-Cache, saying so once, and its outputs are the method's alone."""
    import diffusers
    import families

    if family == "kandinsky6" and not hasattr(diffusers, "Kandinsky6Transformer3DModel"):
        pytest.skip("this diffusers has no Kandinsky6Transformer3DModel")  # diffusers 0.42 and later
    pipe = getattr(families, f"{family}_pipe")()
    model = pipe.transformer
    with relcache.cached(model, dataclasses.replace(FORA(1), cfg_cache=None)):
        relcache.begin_generation(model, 4)
        alone = _calls_with_audio(pipe, batched)
    with relcache.cached(model, _skip_every_step()):
        relcache.begin_generation(model, 4)
        with pytest.warns(UserWarning, match=r"CFG-Cache is off for this model: its output holds \['output 1'\]") as w:
            got = _calls_with_audio(pipe, batched)
        assert {r.filename for r in w if "CFG-Cache is off" in str(r.message)} == {__file__}  # the caller's line
        assert relcache.stats(model).uncond_skipped == 0
    for a, b in zip(alone, got, strict=True):
        assert len(a) == len(b) == 2
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(tb, ta, rtol=0, atol=0)


def test_outputs_besides_the_sample_keep_every_generation_alike():
    """Found by review: the first call that showed the other outputs had run its modules with a state per CFG half, so
    RCS measured the conditional half for the rest of that generation, and the whole batch in every later one: the
    same seed gave other input errors (and decisions) in generation 1 than after. Every generation now runs as the
    first one did, which is CFG-Cache that never skips on a model with the sample alone."""
    from custom_dit import ADAPTER, TinyDiT

    from relcache.models.custom import CustomAdapter

    class TwoOutputs(TinyDiT):
        def forward(self, x, t, y):
            out = super().forward(x, t, y)
            return out, out.mean(dim=(1, 2, 3))

    def loop(model, steps: int = 8) -> list[torch.Tensor]:
        relcache.begin_generation(model, steps)
        x, outs = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), []
        y = torch.tensor([3, 5, 10, 10])
        with torch.no_grad():
            for i in range(steps):
                out = model(torch.cat([x, x]), torch.full((4,), 999 - 120 * i), y)
                cond, uncond = (out[0] if isinstance(out, tuple) else out).chunk(2)
                outs.append(uncond + 4.0 * (cond - uncond))
                x = x - 0.1 * outs[-1]
        return outs

    torch.manual_seed(0)
    two = TwoOutputs(depth=2).eval()
    one = TinyDiT(depth=2).eval()
    one.load_state_dict(two.state_dict())
    skipping = dataclasses.replace(RFC(threshold=0.2), cfg_cache=CFGCache(skip_full=True, window=(0.0, 1.0)))
    never = dataclasses.replace(RFC(threshold=0.2), cfg_cache=CFGCache(skip_full=True, window=(0.0, 0.0)))
    with relcache.cached(one, never, adapter=CustomAdapter(**ADAPTER)):
        ref = loop(one)
        ref_errors = relcache.stats(one).contexts["default"].input_errors
    with relcache.cached(two, skipping, adapter=CustomAdapter(**ADAPTER)):
        for generation in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "CFG-Cache is off for this model", tested above
                got = loop(two)
            assert relcache.stats(two).contexts["default"].input_errors == ref_errors, f"generation {generation + 1}"
            assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    # off for good, CFG-Cache's window is not checked against later step counts (as split CFG's is not): a window of
    # steps 5..8 fits the first generation's 8 steps, not a later one's 4, which runs (it raised ConfigError, review)
    by_steps = dataclasses.replace(skipping, cfg_cache=CFGCache(skip_full=True, window_steps=(5, 8)))
    with relcache.cached(two, by_steps, adapter=CustomAdapter(**ADAPTER)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop(two)
        assert len(loop(two, steps=4)) == 4


def test_a_compiled_model_with_outputs_besides_the_sample_runs_the_method_alone():
    """Under torch.compile the first call runs eagerly and then again compiled (its rehearsal): CFG-Cache turned off
    by the eager run planned no row groups for the rerun, which was then not the same kind of call, and the first call
    raised "a rehearsed first call was asked to run eagerly again". Now the rerun keeps the first call's row groups
    (a state per half, as every later generation); two compiled generations give the eager method's outputs. The
    warning names the user's line, not relcache's. One block: the rehearsal's row groups are the model's, not a
    block's, and two blocks traced in about 1.5 times as long (suite time)."""
    import families

    pipe = families.ltx2_pipe(layers=1)
    model = pipe.transformer
    with relcache.cached(model, dataclasses.replace(FORA(1), cfg_cache=None)):
        relcache.begin_generation(model, 4)
        alone = _calls_with_audio(pipe, True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    pipe.transformer = compiled
    try:
        with relcache.cached(compiled, _skip_every_step()):
            for _ in range(2):
                relcache.begin_generation(compiled, 4)
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    got = _calls_with_audio(pipe, True)
                for a, b in zip(alone, got, strict=True):
                    for ta, tb in zip(a, b, strict=True):
                        torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-6)
            assert relcache.stats(compiled).uncond_skipped == 0
    finally:
        pipe.transformer = model
        torch._dynamo.reset()
    off = [w for w in seen if "CFG-Cache is off" in str(w.message)]
    assert not off  # once, in the first generation


def test_the_peak_counts_cfg_caches_deltas():
    """``cache_bytes`` counts CFG-Cache's stored deltas, ``peak_cache_bytes`` did not: after a pipeline frees its
    caches the peak, "the full figure", read less than ``cache_bytes`` had during the generation."""
    from conftest import tiny_dit

    model = tiny_dit()
    relcache.enable(model, dataclasses.replace(TaylorSeer(3), cfg_cache=CFGCache(skip_full=True, interval=3)))
    x, labels, seen = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, NULL]), []
    try:
        relcache.begin_generation(model, 10)
        with torch.no_grad():
            for i in range(10):
                out = model(torch.cat([x, x]), timestep=torch.full((2,), 999 - 99 * i), class_labels=labels).sample
                seen.append(relcache.stats(model).cache_bytes)
                x = x - 0.05 * out[:1]
        st = relcache.stats(model)
    finally:
        relcache.disable(model)
    deltas = 2 * (4 * 8 * 8) * 8  # ΔLF and ΔHF: complex64 (8 bytes) spectra of one sample's 4x8x8 output
    assert st.peak_cache_bytes == max(seen) == sum(st.peak_cache_bytes_by_kind.values()) + deltas


@pytest.mark.parametrize("uncond_first", [False, True])
def test_a_loop_calling_uncond_before_cond_is_warned(uncond_first):
    """CFG-Cache answers a step's "uncond" call from the "cond" call made before it: a loop calling "uncond" first
    skips nothing, and FasterCache (refresh_full) then makes every step full, silently until found by review. Said
    once; the loop in the other order is not warned and skips."""
    from conftest import tiny_dit

    dit = tiny_dit()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    order = ("uncond", "cond") if uncond_first else ("cond", "uncond")
    with relcache.cached(dit, FasterCache(warmup=2)), warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        relcache.begin_generation(dit, 12)
        for i in range(12):
            for name in order:
                _set_cache_context(dit, CacheContext(name))
                label = torch.tensor([3 if name == "cond" else 1000])
                dit(x, timestep=torch.full((1,), 900 - 70 * i), class_labels=label)
            _set_cache_context(dit, None)
        st = relcache.stats(dit)
    said = [str(w.message) for w in seen if 'context "uncond" before "cond"' in str(w.message)]
    assert len(said) == (1 if uncond_first else 0)
    if uncond_first:
        assert "makes every step full" in said[0] and st.uncond_skipped == 0 and st.nfc == 12
    else:
        assert st.uncond_skipped > 0 and st.nfc < 12


def test_guidance_that_starts_part_way_is_said_to_leave_cfg_cache_off():
    """CFG-Cache is decided at a context's first call: a loop whose guidance starts at step 3 (batch 1, then a CFG
    batch of 2) ran the rest without CFG-Cache, without a word (found by review). Said once now; a loop with guidance
    from the start is not warned and skips."""
    from conftest import tiny_dit

    def loop(dit, start):
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        relcache.begin_generation(dit, 12)
        with torch.no_grad():
            for i in range(12):
                on = i >= start
                t = torch.full((2 if on else 1,), 900 - 70 * i)
                if on:
                    out = dit(torch.cat([x, x]), timestep=t, class_labels=torch.tensor([3, 1000])).sample
                    cond, uncond = out.chunk(2)
                    eps = uncond + 2.0 * (cond - uncond)
                else:
                    eps = dit(x, timestep=t, class_labels=torch.tensor([3])).sample
                x = x - 0.05 * eps

    config = dataclasses.replace(FORA(1, 1), cfg_cache=CFGCache(interval=3, window_steps=(2, 12), skip_full=True))
    for start in (3, 0):
        dit = tiny_dit()
        with relcache.cached(dit, config), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loop(dit, start)
            loop(dit, start)
            skipped = relcache.stats(dit).uncond_skipped
        said = [str(w.message) for w in seen if "starts part-way" in str(w.message)]
        assert len(said) == (1 if start else 0), said
        assert (skipped > 0) is (start == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rebuild_of_a_half_precision_output_is_in_its_dtype(dtype):
    """The band split runs in float32 and the rebuild is cast back to the output's dtype (docs/spec.md, §CFG-Cache),
    so that a batched skip's ``cat`` of the two halves and a split "uncond" call keep the model's dtype. cond = 1, the
    difference -0.5 (low band) + 0.25 · checkerboard (high band), w1 = 1.1, w2 = 1.3: 1 - 0.55 ± 0.325 = 0.775 and
    0.125; 0.775 is 0.7734375 in bfloat16 (step 2^-8) and 0.774902... in float16 (step 2^-11)."""
    checker = (torch.arange(8).view(-1, 1) + torch.arange(8)).remainder(2).float().mul(2).sub(1)
    cond = torch.ones(1, 2, 8, 8, dtype=dtype)
    other = (cond.float() - 0.5 + 0.25 * checker).to(dtype)
    cfg = CFGCache()
    got = cfg.rebuild(cond, *cfg.deltas(other, cond), 1.1, 1.3)
    assert got.dtype == dtype
    want = (1 - 0.5 * 1.1 + 0.25 * 1.3 * checker).expand(1, 2, 8, 8).to(dtype)
    assert torch.equal(got, want)


def test_default_radius_of_a_non_square_output_is_a_fifth_of_its_shorter_side():
    """r = min(H, W) // 5 (docs/spec.md, §CFG-Cache). 10 x 20: r = 10 // 5 = 2, the same 13 bins around (5, 10) as the
    10 x 10 disk above (the longer side would give r = 4: 49 bins); 20 x 10 the same, transposed."""
    mask = CFGCache().low_mask(10, 20)
    assert mask.shape == (10, 20) and int(mask.sum()) == 13
    assert mask[5, 10] and mask[3, 10] and mask[5, 12] and mask[6, 11] and not mask[5, 13] and not mask[2, 10]
    assert torch.equal(CFGCache().low_mask(20, 10), mask.T)
