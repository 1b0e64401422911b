"""A pipeline's lifecycle around caching: a scheduler swapped after enable, img2img's shortened schedule, and the
end of each call (tiny pipelines built offline, as in families.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

pytest.importorskip("transformers")

from conftest import dit_pipe, run_loop, tiny_dit  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FluxImg2ImgPipeline,
)
from families import flux_kwargs, flux_pipe, sd3_kwargs, sd3_pipe, wan_kwargs, wan_pipe  # noqa: E402

import relcache  # noqa: E402
from relcache import RFC, TaylorSeer  # noqa: E402


def test_a_scheduler_swapped_after_enable_starts_its_own_generations():
    """pipe.scheduler = X.from_config(...) after enable: the new scheduler's set_timesteps is not patched, so the
    second call used to continue the first generation (16 more steps, all forecast from the first image)."""
    pipe = dit_pipe()
    old = pipe.scheduler
    relcache.enable(pipe, RFC(target_nfc=4))
    try:
        pipe([1, 7], num_inference_steps=8, output_type="np")
        assert relcache.stats(pipe).num_steps == 8
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(old.config)
        for _ in range(2):  # the first call notices the swap, the second goes through the patched set_timesteps
            pipe([1, 7], num_inference_steps=16, output_type="np")
            stats = relcache.stats(pipe)
            assert stats.num_steps == 16 and stats.nfc == 4 and stats.full_steps[-1] == 15
    finally:
        relcache.disable(pipe)
    for scheduler in (old, pipe.scheduler):  # both restored
        assert "set_timesteps" not in vars(scheduler) and "set_begin_index" not in vars(scheduler)
    assert "maybe_free_model_hooks" not in vars(pipe)


@pytest.mark.parametrize("first", ["a", "b"])
def test_a_scheduler_shared_by_two_enabled_pipelines_is_restored_in_any_order(first):
    """Each controller unlinks its own wrapper wherever it sits in the chain: disabling one pipeline keeps the other
    told of its schedules, and after both the scheduler is as before. A deep copy of a patched scheduler is its own."""
    scheduler = DDIMScheduler()
    pipes = {"a": dit_pipe(scheduler), "b": dit_pipe(scheduler)}
    for pipe in pipes.values():
        relcache.enable(pipe, TaylorSeer(3))
    before = len(scheduler.timesteps)
    twin = copy.deepcopy(scheduler)
    twin.set_timesteps(20)
    assert len(twin.timesteps) == 20 and len(scheduler.timesteps) == before
    relcache.disable(pipes[first])
    other = pipes["b" if first == "a" else "a"]
    other([1, 7], num_inference_steps=6, output_type="np")
    assert relcache.stats(other).num_steps == 6 and relcache.stats(other).full_steps == [0, 1, 4]
    relcache.disable(other)
    assert not {"set_timesteps", "set_begin_index"} & set(vars(scheduler))


def test_img2img_budget_counts_the_steps_that_run():
    """strength 0.5 of 30 steps runs 15: set_begin_index announces them, so the budget is met exactly."""
    pipe = FluxImg2ImgPipeline(**flux_pipe().components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with relcache.cached(pipe, RFC(target_nfc=10)):
        pipe(image=image, strength=0.5, num_inference_steps=30, output_type="latent", **flux_kwargs())
        stats = relcache.stats(pipe)
    assert stats.num_steps == 15 and stats.nfc == 10


def test_the_end_of_a_call_frees_the_caches_and_ends_the_generation():
    """DiT has no diffusers CacheMixin, so nothing reset it: caches stayed held after the call, and a hand-written
    loop afterwards (without begin_generation) continued the pipeline's generation."""
    pipe = dit_pipe()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with relcache.cached(pipe, TaylorSeer(3)):
        pipe([1, 7], num_inference_steps=8, output_type="np")
        assert relcache.stats(pipe).full_steps == [0, 1, 4, 7]  # still readable
        assert relcache.stats(pipe).cache_bytes == 0  # TaylorSeer: the predictor states alone hold tensors
        run_loop(pipe.transformer, x, torch.tensor([1, 7]), steps=8, begin=False)
        assert relcache.stats(pipe).num_steps == 8 and relcache.stats(pipe).full_steps == [0, 1, 4, 7]
        assert relcache.stats(pipe).cache_bytes > 0  # a bare loop has no end to notice


def test_flux_tokens_take_their_image_layout_for_cfg_cache():
    """FLUX packs 2x2 latent patches into row-major tokens: the grid view puts channel c*4 + 2*dy + dx of grid cell
    (i, j) at latent (c, 2i + dy, 2j + dx), on a non-square latent, and turns back exactly."""
    from diffusers import FluxPipeline

    from relcache.models.flux import FluxAdapter

    latents = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    tokens = FluxPipeline._pack_latents(latents, 2, 3, 4, 6)  # (2, 2·3 cells, 12)
    ids = FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32)
    to_grid, to_tokens = FluxAdapter().spatial_grid((), {"img_ids": ids})
    grid = to_grid(tokens)
    assert grid.shape == (2, 12, 2, 3)
    for c, dy, dx, i, j in ((0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (2, 1, 1, 0, 1)):
        assert torch.equal(grid[:, c * 4 + 2 * dy + dx, i, j], latents[:, c, 2 * i + dy, 2 * j + dx])
    assert torch.equal(to_tokens(grid), tokens)
    # ids that are not one row-major grid of the output's tokens: the FFT stays on the last two axes
    assert FluxAdapter().spatial_grid((), {"img_ids": ids[:5]}) is None
    square = FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32)
    reference = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)[4:]
    reference[:, 0] = 1  # Kontext-style: a target grid of 2x2 and reference tokens, 16 tokens as if 4x4
    assert FluxAdapter().spatial_grid((), {"img_ids": torch.cat([square, reference])}) is None
    assert FluxAdapter().spatial_grid((), {"img_ids": ids.to("meta")}) is None


def test_flux_true_cfg_cache_splits_bands_over_the_image():
    """With true CFG (split cond/uncond calls), CFG-Cache's band split sees FLUX's output as (B, C, h, w), not as
    (tokens, channels)."""
    import dataclasses

    from families import clip_pooled, t5_embeds

    from relcache.methods.cfg_cache import CFGCache

    pipe = flux_pipe()
    kwargs = flux_kwargs(size=32)
    kwargs.update(negative_prompt_embeds=t5_embeds(16)[1], negative_pooled_prompt_embeds=clip_pooled(16)[1],
                  true_cfg_scale=3.0)
    seen = []
    split = CFGCache.split

    def spy(self, x):
        seen.append(tuple(x.shape))
        return split(self, x)

    cfg = CFGCache(window=(0.0, 1.0), interval=3)  # uncond at 0, 3, 6; skipped at 1, 2, 4, 5, 7
    with pytest.MonkeyPatch.context() as mp, relcache.cached(
        pipe, dataclasses.replace(relcache.FORA(1, 1), cfg_cache=cfg)
    ):
        mp.setattr(CFGCache, "split", spy)
        pipe(num_inference_steps=8, output_type="latent", **kwargs)
        stats = relcache.stats(pipe)
    assert stats.contexts["uncond"].uncond_skipped_steps == [1, 2, 4, 5, 7]
    assert seen and set(seen) == {(1, 8, 8, 8)}  # 32x32 image -> 16x16 latents -> 8x8 cells of 2x2 patches


def test_sd3_skip_layer_guidance_calls_are_left_alone():
    """SD3.5's skip-layer guidance calls the transformer a second time at some steps (with ``skip_layers``): that
    call is the plain model and counts no step, so the budget holds and every-step-full stays exact."""
    from families import sd3_kwargs, sd3_pipe

    pipe = sd3_pipe()
    kwargs = dict(num_inference_steps=10, output_type="latent", skip_guidance_layers=[1],
                  skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.6, **sd3_kwargs())
    calls: list[int] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(0))

    def run() -> torch.Tensor:
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    ref = run()
    assert len(calls) == 15  # 10 steps, 5 of them with the extra pass
    with relcache.cached(pipe, RFC(target_nfc=5)):
        run()
        stats = relcache.stats(pipe)
        assert stats.num_steps == 10 and stats.nfc == 5
    with relcache.cached(pipe, relcache.FORA(1, 1)):
        assert torch.equal(run(), ref)


def test_nested_cached_blocks_leave_caching_to_the_outer_one():
    """``cached(pipe)`` inside ``cached(pipe.transformer)`` attached the pipeline, then its exit turned caching off for
    the transformer: the rest of the outer block ran uncached, and the outer exit raised NotEnabledError, replacing
    any error the block raised. The inner block now leaves caching on; the outer one turns it off."""
    pipe = dit_pipe()
    with relcache.cached(pipe.transformer, relcache.FORA(3)):
        with relcache.cached(pipe, relcache.FORA(3)):
            pass
        assert relcache.is_enabled(pipe.transformer)
    assert not relcache.is_enabled(pipe)
    with pytest.raises(ValueError, match="the block's own error"):
        with relcache.cached(pipe.transformer, relcache.FORA(3)), relcache.cached(pipe, relcache.FORA(3)):
            raise ValueError("the block's own error")
    assert not relcache.is_enabled(pipe)
    with relcache.cached(pipe, relcache.FORA(3)):  # turned off inside the block: it ends without a second disable
        relcache.disable(pipe)
    assert not relcache.is_enabled(pipe)
    pipe_vars = set(vars(pipe))
    with relcache.cached(pipe.transformer, relcache.FORA(3)):  # inner blocks one after another: each detaches its
        for _ in range(2):  # pipeline at its end (the second was refused as already enabled)
            with relcache.cached(pipe, relcache.FORA(3)):
                pipe([1], num_inference_steps=4)
            assert set(vars(pipe)) == pipe_vars and relcache.is_enabled(pipe.transformer)


def test_disable_on_a_pipeline_whose_transformer_was_replaced_turns_off_the_earlier_one():
    """``pipe.transformer = other`` after ``enable(pipe)`` (another checkpoint): ``disable(pipe)`` raised
    NotEnabledError about the new transformer and left the old one's hooks and the pipeline's and scheduler's patches
    in place. It now turns off the session that patched the pipeline; a pipeline never enabled still refuses."""
    pipe = dit_pipe()
    old = pipe.transformer
    pipe_vars, scheduler_vars = set(vars(pipe)), set(vars(pipe.scheduler))
    relcache.enable(pipe, relcache.FORA(3))
    pipe.transformer = dit_pipe().transformer
    relcache.disable(pipe)
    assert not relcache.is_enabled(old) and set(vars(pipe)) == pipe_vars
    registry = getattr(old, "_diffusers_hook", None)
    assert set(vars(pipe.scheduler)) == scheduler_vars and (registry is None or not registry.hooks)
    with pytest.raises(relcache.NotEnabledError, match="not enabled on this DiTTransformer2DModel"):
        relcache.disable(pipe)
    # a pipeline only found driving an enabled transformer is not the user's to turn off through: refused
    pipe = dit_pipe()
    old = pipe.transformer
    relcache.enable(old, relcache.FORA(3))
    pipe([1], num_inference_steps=4)
    pipe.transformer = dit_pipe().transformer
    with pytest.raises(relcache.NotEnabledError):
        relcache.disable(pipe)
    assert relcache.is_enabled(old)
    relcache.disable(old)
    # two enabled pipelines sharing a transformer: the one whose transformer was replaced is detached, the other
    # keeps its caching
    a = dit_pipe()
    b = type(a)(**a.components)
    relcache.enable(a, relcache.FORA(3))
    relcache.enable(b, relcache.FORA(3))
    a.transformer = dit_pipe().transformer
    relcache.disable(a)
    assert relcache.is_enabled(b) and "maybe_free_model_hooks" not in vars(a)
    relcache.disable(b)


def test_a_deep_copy_of_an_enabled_model_or_pipeline_is_refused_and_after_disable_is_plain():
    """diffusers' hooks keep the original's forward: a deep copy of an enabled transformer ran the original's weights
    and advanced the original's generation. Refused, naming the way out; after ``disable`` the copy is a plain model
    of its own (its halved weights change its output)."""
    pipe = dit_pipe()
    relcache.enable(pipe, TaylorSeer(2))
    for what in (pipe, pipe.transformer):
        with pytest.raises(relcache.ConfigError, match=r"copy.deepcopy of a model or pipeline with relcache enabled "
                                                       r"is refused.*relcache.disable\(...\) before copying"):
            copy.deepcopy(what)
    relcache.disable(pipe)
    twin = copy.deepcopy(pipe.transformer)
    assert not relcache.is_enabled(twin)
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 500), torch.tensor([1, 2])
    with torch.no_grad():
        before = pipe.transformer(x, timestep=t, class_labels=y).sample
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.equal(twin(x, timestep=t, class_labels=y).sample, before)
        assert torch.equal(pipe.transformer(x, timestep=t, class_labels=y).sample, before)


def test_pickling_an_enabled_model_or_pipeline_is_refused_naming_the_way_out():
    """``torch.save(model)`` of an enabled model failed with "cannot pickle 'weakref.ReferenceType' object" (after a
    call; before one, a local function of the hooks): neither relcache nor the way out was named. Refused as a deep
    copy is; the weights save as usual, and after ``disable`` the model pickles and loads as a plain one."""
    pipe = dit_pipe()
    relcache.enable(pipe, RFC(threshold=0.3))
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 500), torch.tensor([1, 2])
    with torch.no_grad():
        pipe.transformer(x, timestep=t, class_labels=y)  # caches hold tensors (and weak references) now
    for what in (pipe, pipe.transformer):
        with pytest.raises(relcache.ConfigError, match=r"pickling \(torch.save\) a model or pipeline with relcache "
                                                       r"enabled is refused.*state_dict\(\).*relcache.disable"):
            torch.save(what, io.BytesIO())
    weights = io.BytesIO()
    torch.save(pipe.transformer.state_dict(), weights)
    relcache.disable(pipe)
    saved = io.BytesIO()
    torch.save(pipe.transformer, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert not relcache.is_enabled(loaded)
    weights.seek(0)
    fresh = tiny_dit(seed=1)  # other random weights, replaced by the saved ones
    fresh.load_state_dict(torch.load(weights))
    with torch.no_grad():
        want = pipe.transformer(x, timestep=t, class_labels=y).sample
        assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, want)
        assert torch.equal(fresh(x, timestep=t, class_labels=y).sample, want)


@pytest.mark.parametrize("case", ["sd3", "wan"], ids=["CFG batch", "split CFG"])
@pytest.mark.parametrize("config", [RFC(target_nfc=4), TaylorSeer(interval=3), relcache.FasterCache(warmup=2)],
                         ids=["RFC", "TaylorSeer", "FasterCache"])
def test_caches_are_freed_after_the_last_step_before_the_vae_decodes(case, config):
    """A pipeline call's caches were held until its end (``maybe_free_model_hooks``), through the VAE's decode, whose
    memory peak they added to (FLUX at 1024x1024: GiBs of caches beside the decode). Each context's
    caches go once its call of the last announced step returns, CFG-Cache's deltas once every context's has; the
    stats keep the generation's numbers. A
    hand-written loop keeps its caches after its announced steps (it may go on)."""
    pipe, kwargs = (sd3_pipe(), sd3_kwargs()) if case == "sd3" else (wan_pipe(), wan_kwargs())
    held: list[int] = []
    decode = pipe.vae.decode

    def watched_decode(*args, **kw):
        held.append(relcache.stats(pipe).cache_bytes)
        return decode(*args, **kw)

    pipe.vae.decode = watched_decode
    steps: list[int] = []

    def at_step(_pipe, i, _t, kw):
        steps.append(relcache.stats(pipe).cache_bytes)
        return kw

    with relcache.cached(pipe, config), torch.no_grad():
        pipe(**kwargs, num_inference_steps=8, output_type="np", callback_on_step_end=at_step)
        st = relcache.stats(pipe)
    assert held == [0] and all(b > 0 for b in steps[:-1]) and steps[-1] == 0, (held, steps)
    assert st.num_steps == 8 and st.peak_cache_bytes > 0 and len(st.full_steps) < 8
    if case == "wan" and isinstance(config, relcache.CacheConfig) and config.cfg_cache is not None:
        assert 7 not in st.contexts["uncond"].full_steps  # the last "uncond" call was still rebuilt from "cond"'s

    model = tiny_dit()
    with relcache.cached(model, config), torch.no_grad():
        run_loop(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), steps=8)
        assert relcache.stats(model).cache_bytes > 0


def test_a_pipeline_that_runs_fewer_timesteps_than_announced_gets_advice_that_applies_to_it():
    """A pipeline that slices its scheduler's timesteps itself (a video-to-video strength without set_begin_index)
    ran fewer steps than announced, and the warning advised ``relcache.begin_generation``, which changes nothing
    inside a pipeline call (its set_timesteps announces again; found by review). The advice now names what does."""
    pipe = dit_pipe()
    bar = pipe.progress_bar
    pipe.progress_bar = lambda iterable=None, total=None: bar(list(iterable)[2:])  # steps 2.. of the 8 announced
    with relcache.cached(pipe, TaylorSeer(interval=2)), torch.no_grad():
        with pytest.warns(RuntimeWarning, match="announced 8 steps .* but ran 6 .*This pipeline runs fewer of its "
                                                "scheduler's timesteps .*relcache.FORA, relcache.TaylorSeer") as got:
            pipe([1, 7], num_inference_steps=8, output_type="latent")
    assert not any("begin_generation(model, num_steps)" in str(w.message) for w in got)
