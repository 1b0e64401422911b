"""Runtime rules checked by hand: split-CFG step counting and CFG-Cache's pairing, window and shapes, batch
modulation's per-sample timesteps, img2img's first timestep, the memory report of a waiting "cond" output, and two
warnings. (A mutation review changed each of these rules without any other test failing.)"""

import dataclasses
import warnings

import torch
from conftest import tiny_dit
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import relcache
from relcache import FORA, CFGCache, CustomAdapter, FasterCache
from relcache.api import _session


def _split_cfg_steps(dit, x, steps, order, after_step=None):
    """A generation of ``steps`` steps calling ``dit`` once per named context in ``order`` at each step (split CFG
    named with diffusers' cache context; class 3 for "cond", the null class for "uncond"), timesteps 900, 830, ..."""
    relcache.begin_generation(dit, steps)
    for i in range(steps):
        for name in order:
            _set_cache_context(dit, CacheContext(name))
            label = torch.tensor([3 if name == "cond" else 1000])
            dit(x, timestep=torch.full((1,), 900 - 70 * i), class_labels=label)
        _set_cache_context(dit, None)
        if after_step is not None:
            after_step()


def test_a_context_starting_late_counts_its_first_step_as_full():
    """Guards ``StepCalls._force_full``'s ``full_steps.append`` (mutant: the step made full but not counted).

    Split CFG named with diffusers' cache context and its step index; "cond" runs steps 0..7, "uncond" only from
    step 4 on (guidance starting part-way). FORA(interval=4, warmup=2) is full at 0, 1 (warm-up) and then where
    (step - 2 + 1) % 4 == 0: step 5. "cond": full at [0, 1, 5]. "uncond"'s first call is step 4, which the schedule
    caches, but nothing is recorded yet, so every module computes: the step is full and must be counted so. "uncond":
    full at [4, 5], NFC 2, and its FLOP fraction 2 full calls of 4 = 0.5, consistent with those full steps (the
    mutant reported full_steps [5], NFC 1, beside the same 0.5). The generation: steps full in any context
    {0, 1, 4, 5}, NFC 4; per context at most 3."""
    dit = tiny_dit()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with relcache.cached(dit, FORA(4, 2)), torch.no_grad():
        relcache.begin_generation(dit, 8)
        for i in range(8):
            for name in ("cond", "uncond") if i >= 4 else ("cond",):
                _set_cache_context(dit, CacheContext(name, step_index=i))
                label = torch.tensor([3 if name == "cond" else 1000])
                dit(x, timestep=torch.full((1,), 900 - 100 * i), class_labels=label)
            _set_cache_context(dit, None)
        st = relcache.stats(dit)
    cond, uncond = st.contexts["cond"], st.contexts["uncond"]
    assert cond.full_steps == [0, 1, 5] and cond.nfc == 3
    assert uncond.full_steps == [4, 5] and uncond.nfc == 2
    assert uncond.flops_fraction == 0.5
    assert (st.full_steps, st.nfc, st.nfc_per_context) == ([0, 1, 4, 5], 4, 3)


def test_split_cfg_refresh_full_forces_the_cond_call_of_every_step_that_runs_uncond():
    """Guards ``CFGRunner.plan``'s pairing rule for a "cond" call, ``uncond_step >= step - 1`` (mutant: ``>= step``,
    which took every "cond" call after the first for one whose "uncond" pair would not run).

    Split CFG, "cond" then "uncond" at each of 12 steps, FasterCache(interval=4, warmup=2, cfg_interval=3,
    cfg_window=(0.25, 1.0)). Module schedule Interval(4, 2): full at 0, 1, 5, 9. CFG window: steps ceil(0.25 * 12)
    = 3 .. 11; refresh steps (phase "step0": step % 3 == 0 inside the window) 3, 6, 9; the others, 4, 5, 7, 8, 10,
    11, skip "uncond" (the delta is stored at step 2, the step before the window). refresh_full makes every step
    that runs both calls full, in both contexts: 0, 1, 2, 3, 6, 9. "cond": the union with its schedule's, [0, 1, 2,
    3, 5, 6, 9] (NFC 7); "uncond": [0, 1, 2, 3, 6, 9], its calls at the six skipped steps rebuilt. The mutant left
    "cond" at its schedule's [0, 1, 5, 9], so the deltas of steps 2, 3 and 6 came from forecast "cond" outputs."""
    dit = tiny_dit()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = FasterCache(interval=4, warmup=2, cfg_interval=3, cfg_window=(0.25, 1.0))
    with relcache.cached(dit, config), torch.no_grad():
        _split_cfg_steps(dit, x, 12, ("cond", "uncond"))
        st = relcache.stats(dit)
    cond, uncond = st.contexts["cond"], st.contexts["uncond"]
    assert cond.full_steps == [0, 1, 2, 3, 5, 6, 9]
    assert uncond.full_steps == [0, 1, 2, 3, 6, 9]
    assert uncond.uncond_skipped_steps == [4, 5, 7, 8, 10, 11]
    assert (st.nfc, st.nfc_per_context) == (7, 7)


def test_uncond_before_cond_is_warned_at_the_second_such_step_not_the_first():
    """Guards ``CFGRunner._check_order``'s ``uncond_first < 2`` (mutant: ``< 1``, warned at the first such step).

    A split-CFG loop calling "uncond" before "cond": at step 0 no "cond" call has run, so nothing is counted; at
    step 1 the "uncond" call finds step 0's "cond" as the latest (first such step, count 1: not warned); at step 2
    the count reaches 2 and the warning comes, once. Warnings seen after steps 0..3: 0, 0, 1, 1."""
    dit = tiny_dit()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    said_after = []
    with relcache.cached(dit, FasterCache(warmup=2)), warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        _split_cfg_steps(dit, x, 4, ("uncond", "cond"), after_step=lambda: said_after.append(
            sum('context "uncond" before "cond"' in str(w.message) for w in seen)))
    assert said_after == [0, 0, 1, 1]


def test_a_short_loop_is_warned_without_the_split_cfg_hint():
    """Guards ``Generations._check_steps``' advice for a loop that ran fewer steps than announced.

    A hand-written loop announces 8 steps and runs 4 (FORA(4, 2): full at 0 and 1, so "2 of them full"); the next
    ``begin_generation`` warns that it ran fewer. The hint about a loop calling the transformer twice per step (which
    makes a loop run *more* calls than announced, warned by ``check_step``) must not be given: it would advise naming
    cache contexts to a loop that simply stopped early."""
    dit = tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with relcache.cached(dit, FORA(4, 2)), torch.no_grad():
        relcache.begin_generation(dit, 8)
        for i in range(4):
            dit(x, timestep=torch.full((2,), 900 - 100 * i), class_labels=torch.tensor([1, 7]))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            relcache.begin_generation(dit, 8)
    said = [str(w.message) for w in seen if "announced 8 steps" in str(w.message)]
    assert len(said) == 1 and "but ran 4 (2 of them full)" in said[0]
    assert "more than once per step" not in said[0]


def test_a_batch_whose_timesteps_differ_per_sample_is_not_served():
    """Guards ``ModulationTable.matches``' host comparison ``all(v == ref for v in got)`` (mutant: ``any``).

    batch_modulation with the announced timesteps 999, 879; step 0 builds the table (its call measures
    FLOPs, so nothing is counted as served). Step 1 is called with per-sample timesteps [879, 872]: only the first
    sample's is the announced 879, so the table (every row computed for 879) must not serve the call: ``served``
    stays 0 and the output equals the per-step products of a model without the option. The mutant served all
    4 projections (3 blocks' norm1.linear and proj_out_1) and gave sample 1 step 879's modulation."""
    ts = [999, 879]  # the two steps the loop runs
    labels = torch.tensor([3, 1000])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for batch_modulation in (False, True):
        model = tiny_dit(layers=3)
        relcache.enable(model, FORA(1, 1), batch_modulation=batch_modulation)
        try:
            relcache.begin_generation(model, timesteps=ts)
            with torch.no_grad():
                model(x, timestep=torch.full((2,), ts[0]), class_labels=labels)
                outs.append(model(x, timestep=torch.tensor([ts[1], ts[1] - 7]), class_labels=labels).sample)
            if batch_modulation:
                assert _session(model).modulation.served == 0
        finally:
            relcache.disable(model)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_the_timesteps_to_run_start_at_the_schedulers_begin_index():
    """Guards ``watching.timesteps_to_run``'s slice from ``begin_index`` (mutant: every timestep), and
    ``steps_to_run`` beside it.

    An img2img scheduler with timesteps 900, 800, ..., 0 (10) whose ``set_begin_index(4)`` skips the first four
    runs 500, 400, 300, 200, 100, 0: six steps. batch_modulation tabulates these (step 0 of the generation is
    timestep 500); with all ten, step i was compared with timestep 900 - 100 i, and no step matched: nothing served
    on the CPU, and on an accelerator a ModulationMismatch at the generation's end. No begin index (None): all ten."""
    from types import SimpleNamespace

    from relcache.runtime.watching import steps_to_run, timesteps_to_run

    timesteps = torch.arange(900, -1, -100)
    skipping = SimpleNamespace(timesteps=timesteps, begin_index=4)
    assert timesteps_to_run(skipping).tolist() == [500, 400, 300, 200, 100, 0]
    assert steps_to_run(skipping) == 6
    plain = SimpleNamespace(timesteps=timesteps, begin_index=None)
    assert timesteps_to_run(plain).tolist() == list(range(900, -1, -100)) and steps_to_run(plain) == 10


def test_a_delta_of_another_resolution_is_not_used():
    """Guards ``CFGState.usable``'s shape check (mutant: any stored delta is usable).

    Batched CFG (the two halves' latents equal) on tiny_dit, FORA(1) (every step full) with CFGCache(interval=3,
    window_steps=(1, 6), align=False), phase "window": refresh steps 1 and 4, skip steps 2, 3 and 5. The latents are
    8x8 for steps 0..2 and 16x16 from step 3 on (DiT's patch embedding takes either). Step 2 rebuilds from step 1's
    8x8 delta; at step 3 that delta does not fit the 16x16 halves, so both halves run and (inside the window) a 16x16
    delta is stored; step 4 refreshes; step 5 rebuilds from step 4's. Skipped: [2, 5]. The mutant rebuilt step 3's
    16x16 half from the 8x8 delta (a size-mismatch RuntimeError in ``CFGCache.rebuild``)."""
    dit = tiny_dit()
    config = dataclasses.replace(FORA(1), cfg_cache=CFGCache(interval=3, window_steps=(1, 6), align=False))
    with relcache.cached(dit, config), torch.no_grad():
        relcache.begin_generation(dit, 6)
        for i in range(6):
            side = 8 if i < 3 else 16
            x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(i))
            out = dit(torch.cat([x, x]), timestep=torch.full((2,), 900 - 100 * i), class_labels=torch.tensor([3, 1000]))
            assert out.sample.shape == (2, 4, side, side)
        st = relcache.stats(dit)
    assert st.contexts["default"].uncond_skipped_steps == [2, 5]


def test_split_cfg_cache_bytes_count_the_cond_output_waiting_for_its_pair():
    """Guards ``CFGState.nbytes``' count of the split-CFG "cond" output kept for the "uncond" call (mutant: left
    out).

    custom_dit's TinyDiT returns a bare tensor (1, 4, 8, 8) float32: 1024 bytes. Split CFG, FORA(1) with
    CFGCache(interval=3, window_steps=(1, 6), align=False), 6 steps. Besides the contexts' own caches, the session
    holds the stored (ΔLF, ΔHF), complex64 spectra of one 4x8x8 output, 2 * 256 * 8 = 4096 bytes, and the last
    "cond" output, 1024: ``cache_bytes`` exceeds the contexts' sum by 5120 (the mutant: 4096).

    (A diffusers transformer's output is a dataclass: the next test.)"""
    from custom_dit import ADAPTER, TinyDiT

    torch.manual_seed(0)
    model = TinyDiT().eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = dataclasses.replace(FORA(1), cfg_cache=CFGCache(interval=3, window_steps=(1, 6), align=False))
    with relcache.cached(model, config, adapter=CustomAdapter(**ADAPTER)), torch.no_grad():
        relcache.begin_generation(model, 6)
        for i in range(6):
            for name in ("cond", "uncond"):
                _set_cache_context(model, CacheContext(name))
                model(x, torch.full((1,), 900.0 - 100 * i), torch.tensor([3 if name == "cond" else 10]))
            _set_cache_context(model, None)
        st = relcache.stats(model)
    assert st.uncond_skipped > 0
    assert st.cache_bytes - sum(c.cache_bytes for c in st.contexts.values()) == 2 * 4 * 8 * 8 * 8 + 4 * 8 * 8 * 4


def test_lists_under_each_table_keyword_stay_whole_when_cutting_a_cfg_batch():
    """Guards ``cfg_io._TABLE_WORDS`` (mutant: "freqs" dropped; the existing check covers "rotary" only).

    Cutting a batch of 2 to its first row: a list of 3-d tensors whose first dim equals the batch is cut, tensor by
    tensor, unless its keyword names a rotary table ("rope", "rotary" or "freqs" in the name), where the tables' first
    dim (2 frames, say) only happens to equal the batch. Each of ``rope_cos_sin``, ``image_rotary_emb`` and
    ``freqs_cis`` holds [(2, 4, 3)] and comes back the same objects; ``features`` holding the same is cut to
    (1, 4, 3)."""
    from relcache.runtime.cfg_io import slice_batch

    names = ("rope_cos_sin", "image_rotary_emb", "freqs_cis", "features")
    tables = {name: [torch.zeros(2, 4, 3)] for name in names}
    _, kwargs = slice_batch((), dict(tables), 2, slice(0, 1))
    for name in names[:3]:
        assert kwargs[name][0] is tables[name][0], name
    assert kwargs["features"][0].shape == (1, 4, 3)


def test_aligned_cfg_cache_stores_no_delta_before_its_window():
    """Guards ``CFGRunner.plan``'s ``routing.store = cfg.skip_full and not routing.half_batch and inside`` on a CFG
    batch (mutant: ``inside`` dropped).

    Batched CFG on tiny_dit, FORA(1) (every step full), CFGCache(align=True, skip_full=True, phase="step0",
    interval=5, window_steps=(3, 10)), 10 steps. Steps 0..2 lie outside the window: they neither skip nor store.
    Step 3: no delta yet, so both halves run and its delta is stored (refreshed at 3). Step 4: the latest refresh
    step counted from 0 is 0, before the window, and a delta exists: not due, skipped. Step 5: refresh step 5 > 3,
    due: both halves, stored. Steps 6..9: the latest refresh step is 5, not past the delta's: skipped. Skipped:
    [4, 6, 7, 8, 9]. The mutant stored deltas at steps 0..2 too, and skipped step 3 with step 2's delta (taken
    outside the window): [3, 4, 6, 7, 8, 9]."""
    dit = tiny_dit()
    cfg = CFGCache(align=True, skip_full=True, phase="step0", interval=5, window_steps=(3, 10))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with relcache.cached(dit, dataclasses.replace(FORA(1), cfg_cache=cfg)), torch.no_grad():
        relcache.begin_generation(dit, 10)
        for i in range(10):
            out = dit(torch.cat([x, x]), timestep=torch.full((2,), 900 - 90 * i), class_labels=torch.tensor([3, 1000]))
            x = x - 0.05 * out.sample[:1]
        st = relcache.stats(dit)
    assert st.contexts["default"].uncond_skipped_steps == [4, 6, 7, 8, 9]


def test_split_cfg_cache_bytes_count_the_cond_output_of_a_diffusers_transformer():
    """The same count on diffusers' DiT, whose output is a dataclass (before the fix the waiting "cond" output was
    counted only when a model returned a bare tensor, so ``cache_bytes`` was one output low on every diffusers
    transformer). Its sample (1, C, 8, 8) float32 is C * 64 * 4 bytes; the stored (ΔLF, ΔHF) are complex64 spectra of
    one such output, 2 * C * 64 * 8 bytes."""
    dit = tiny_dit()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = dataclasses.replace(FORA(1), cfg_cache=CFGCache(interval=3, window_steps=(1, 6), align=False))
    with relcache.cached(dit, config), torch.no_grad():
        relcache.begin_generation(dit, 6)
        for i in range(6):
            for name in ("cond", "uncond"):
                _set_cache_context(dit, CacheContext(name))
                out = dit(x, timestep=torch.full((1,), 900 - 100 * i),
                          class_labels=torch.tensor([3 if name == "cond" else 1000]))
            _set_cache_context(dit, None)
        st = relcache.stats(dit)
    channels = out.sample.shape[1]
    assert out.sample.shape == (1, channels, 8, 8) and st.uncond_skipped > 0
    extra = st.cache_bytes - sum(c.cache_bytes for c in st.contexts.values())
    assert extra == 2 * channels * 64 * 8 + channels * 64 * 4
