"""Two pipelines driving one enabled transformer (issue 16, item 1): each pipeline's calls are generations of their
own, with their own step count and budget, and the end of each call frees the caches."""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("transformers")

from conftest import dit_pipe  # noqa: E402
from diffusers import DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC, TaylorSeer  # noqa: E402

STEPS = 10


def _call(pipe: DiTPipeline, steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(pipe([1, 2], num_inference_steps=steps, output_type="np",
                                generator=torch.Generator().manual_seed(seed)).images)


def _second(a: DiTPipeline) -> DiTPipeline:
    """Pipeline B around A's transformer and VAE, with a scheduler of its own (the issue's example)."""
    b = DiTPipeline(transformer=a.transformer, vae=a.vae, scheduler=DDIMScheduler.from_config(a.scheduler.config))
    b.set_progress_bar_config(disable=True)
    return b


def _alone(config: relcache.CacheConfig, calls: int) -> list[torch.Tensor]:
    """The same calls on a pipeline of its own: what B's calls must equal."""
    pipe = dit_pipe()
    with relcache.cached(pipe, config):
        return [_call(pipe, seed=i) for i in range(calls)]


@pytest.mark.parametrize("build", ["components", "from_pipe"])
def test_a_second_pipeline_starts_its_own_generations(build):
    """B's calls used to merge into one long generation: 20 steps, full steps [0, 1, 5, 9, 13, 17], B's second
    call off the same call on its own pipeline by 0.54. Each call is now a generation of its own, bit-identical to
    the same calls on a pipeline of its own, and its caches are freed at its end."""
    a = dit_pipe()
    relcache.enable(a, FORA(4))
    try:
        _call(a, steps=6)
        b = _second(a) if build == "components" else DiTPipeline.from_pipe(
            a, scheduler=DDIMScheduler.from_config(a.scheduler.config))
        b.set_progress_bar_config(disable=True)
        outs = []
        for i in range(2):
            outs.append(_call(b, seed=i))
            stats = relcache.stats(b)
            assert stats.num_steps == STEPS and stats.full_steps == [0, 1, 5, 9]
            assert stats.cache_bytes == 0  # freed at the end of B's call
        for got, ref in zip(outs, _alone(FORA(4), 2), strict=True):
            assert torch.equal(got, ref)
        _call(a, steps=6)  # A again: its own 6 steps
        assert relcache.stats(a).num_steps == 6
    finally:
        relcache.disable(a)
    for obj in (a, b, a.scheduler, b.scheduler):  # every patch removed, B's too
        assert not {"set_timesteps", "set_begin_index", "maybe_free_model_hooks"} & set(vars(obj))


def test_a_second_pipeline_gets_its_own_budget():
    """With RFC(target_nfc=4), B's second call used to have no full step at all."""
    a = dit_pipe()
    with relcache.cached(a, RFC(target_nfc=4)):
        _call(a, steps=6)
        b = _second(a)
        for steps in (STEPS, 8):
            _call(b, steps=steps)
            stats = relcache.stats(b)
            assert stats.num_steps == steps and stats.nfc == 4


def test_sd3_img2img_from_a_text_to_image_pipelines_components():
    """The serving case: an img2img pipeline built from a text-to-image pipeline's components with its own
    scheduler. Its first call used to run on the budget of the previous 8-step call (steps 8-14 all forecast), the
    second to continue the first (no full step), and its caches stayed held after the call."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from families import STEPS as T2I_STEPS
    from families import sd3_kwargs, sd3_pipe

    t2i = sd3_pipe()
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def img2img(pipe: StableDiffusion3Img2ImgPipeline) -> torch.Tensor:
        return pipe(image=image, strength=0.5, num_inference_steps=30, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **sd3_kwargs()).images

    components = {**t2i.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(t2i.scheduler.config)}
    with relcache.cached(t2i, RFC(target_nfc=4)):
        t2i(num_inference_steps=T2I_STEPS, output_type="latent", **sd3_kwargs())
        i2i = StableDiffusion3Img2ImgPipeline(**components)
        i2i.set_progress_bar_config(disable=True)
        outs = []
        for _ in range(2):
            outs.append(img2img(i2i))
            stats = relcache.stats(i2i)
            assert stats.num_steps == 15 and stats.nfc == 4
        assert torch.equal(outs[0], outs[1])  # the second call is a generation of its own, not a continuation
    ref_pipe = StableDiffusion3Img2ImgPipeline(**{**sd3_pipe().components, "scheduler": components["scheduler"]})
    ref_pipe.set_progress_bar_config(disable=True)
    with relcache.cached(ref_pipe, RFC(target_nfc=4)):
        assert torch.equal(img2img(ref_pipe), outs[0])


def test_enable_on_a_pipeline_sharing_an_enabled_transformer():
    """(choice) enable(B) with A's settings attaches B; other settings, or enabling A twice, are refused clearly;
    disable through either turns caching off for both."""
    a = dit_pipe()
    b = _second(a)
    relcache.enable(a, FORA(4))
    with pytest.raises(relcache.AlreadyEnabledError,
                       match="already enabled .by another pipeline sharing it, or on its own.*same settings"):
        relcache.enable(b, FORA(3))
    with pytest.raises(relcache.AlreadyEnabledError, match="by another pipeline sharing it, or on its own"):
        relcache.enable(b, FORA(4), record_errors=True)
    with pytest.raises(relcache.AlreadyEnabledError, match="already enabled on this DiTTransformer2DModel"):
        relcache.enable(a, FORA(4))
    relcache.enable(b, FORA(4))
    with pytest.raises(relcache.AlreadyEnabledError, match="already enabled"):
        relcache.enable(b, FORA(4))
    _call(b)
    assert relcache.stats(b).full_steps == [0, 1, 5, 9] and relcache.stats(b).cache_bytes == 0
    relcache.disable(b)
    assert not relcache.is_enabled(a) and not relcache.is_enabled(b)
    for obj in (a, b, a.scheduler, b.scheduler):
        assert not {"set_timesteps", "set_begin_index", "maybe_free_model_hooks"} & set(vars(obj))


def test_a_pipeline_found_driving_the_model_is_held_weakly():
    """Pipelines made per request (from_pipe) and dropped are not kept alive by the transformer they drove."""
    a = dit_pipe()
    with relcache.cached(a, TaylorSeer(2)):
        b = _second(a)
        _call(b, steps=4)
        ref = __import__("weakref").ref(b)
        del b
        gc.collect()
        assert ref() is None
        _call(a, steps=4)
        assert relcache.stats(a).num_steps == 4


def test_enabled_on_the_bare_transformer_a_pipeline_call_is_still_one_generation():
    """Enabled on the transformer alone, a pipeline driving it announces its steps all the same (RFC's budget
    needs them) and the end of its call ends the generation."""
    pipe = dit_pipe()
    with relcache.cached(pipe.transformer, RFC(target_nfc=4)):
        for steps in (STEPS, 6):
            _call(pipe, steps=steps)
            stats = relcache.stats(pipe)
            assert stats.num_steps == steps and stats.nfc == 4
    assert "maybe_free_model_hooks" not in vars(pipe)
