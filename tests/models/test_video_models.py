"""Video transformers through their own diffusers pipelines, built tiny and offline: Latte and CogVideoX.

Both batch CFG in one call with the unconditional half first. A tiny T5 encoder (from ``T5Config``, random weights)
computes the prompt embeddings, which are passed as ``prompt_embeds``/``negative_prompt_embeds``: no tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    LattePipeline,
    LatteTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC, CFGCache, FasterCache, Interval  # noqa: E402

STEPS = 10


@functools.cache
def t5(dim: int = 16, seq: int = 6) -> tuple[T5EncoderModel, torch.Tensor, torch.Tensor]:
    """A tiny T5 encoder and its (prompt, negative prompt) embeddings of fixed token ids, each (1, seq, dim)."""
    torch.manual_seed(0)
    enc = T5EncoderModel(T5Config(vocab_size=64, d_model=dim, d_ff=2 * dim, d_kv=8, num_layers=1, num_heads=2)).eval()
    ids = torch.randint(1, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = enc(ids).last_hidden_state
    return enc, out[:1].clone(), out[1:].clone()


def latte_pipe() -> LattePipeline:
    """Latte-like, 2 layers (spatial + temporal); 4 frames of 16x16 -> 8x8 latents -> 16 patches per frame."""
    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=4,
        attention_bias=True,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(4, 4), layers_per_block=1,
        latent_channels=4, norm_num_groups=2, sample_size=16,
    ).eval()
    pipe = LattePipeline(tokenizer=None, text_encoder=t5()[0], vae=vae, transformer=transformer,
                         scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latte_kwargs(guidance: float = 4.0) -> dict[str, Any]:
    _, emb, neg = t5()
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, negative_prompt=None, guidance_scale=guidance,
                height=16, width=16, video_length=4)


def cogvideox_pipe() -> CogVideoXPipeline:
    """CogVideoX-like, 2 expert blocks; 5 frames of 8x8 -> 2 latent frames of 4x4 -> 8 video + 6 text tokens."""
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=16,
        num_layers=2, sample_width=4, sample_height=4, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=6,
    ).eval()
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(4, 4), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=t5()[0], vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_kwargs(guidance: float = 6.0) -> dict[str, Any]:
    _, emb, neg = t5()
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=guidance, height=8, width=8,
                num_frames=5, max_sequence_length=6)


@dataclass(frozen=True)
class Case:
    build: Callable[[], Any]
    kwargs: Callable[..., dict[str, Any]]
    modules: list[str]
    context: str  # the call context of the pipeline's (single, CFG-batched) transformer call


LATTE_LAYER = (("transformer_blocks", ("attn1", "attn2", "ff")), ("temporal_transformer_blocks", ("attn1", "ff")))
CASES = {
    "latte": Case(latte_pipe, latte_kwargs,
                  [f"{p}.{i}.{a}" for i in range(2) for p, attrs in LATTE_LAYER for a in attrs], "default"),
    "cogvideox": Case(cogvideox_pipe, cogvideox_kwargs,
                      [f"transformer_blocks.{i}.{a}" for i in range(2) for a in ("attn1", "ff")], "cond_uncond"),
}


@pytest.fixture(scope="module", params=list(CASES))
def built(request: pytest.FixtureRequest) -> tuple[Case, Any, torch.Tensor]:
    """(case, pipeline, uncached output) for each model, built once."""
    case = CASES[request.param]
    pipe = case.build()
    return case, pipe, generate(pipe, case)[0]


def generate(pipe: Any, case: Case, guidance: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The frames and every transformer call's output (read by a forward hook)."""
    outs: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_hook(lambda _m, _a, out: outs.append(out[0]))
    kw = case.kwargs() if guidance is None else case.kwargs(guidance)
    try:
        frames = pipe(**kw, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="pt").frames
    finally:
        handle.remove()
    return frames, outs


def generate_with_stats(pipe: Any, case: Case, config: relcache.CacheConfig, guidance: float | None = None):
    """Frames, transformer outputs and the stats as they stand after the last transformer call."""
    seen: list[relcache.CacheStats] = []
    with relcache.cached(pipe, config):
        handle = pipe.transformer.register_forward_hook(lambda *_: seen.append(relcache.stats(pipe)))
        try:
            frames, outs = generate(pipe, case, guidance)
        finally:
            handle.remove()
    return frames, outs, seen[-1]


def test_adapters_list_modules_in_execution_order_with_matching_inputs(built):
    case, pipe, _ = built
    relcache.enable(pipe, FORA(1, 1))
    specs = list(vars(pipe.transformer)["_relcache"].modules)
    relcache.disable(pipe)
    assert [s.name for s in specs] == case.modules
    calls: list[str] = []
    handles = []
    for spec in specs:
        def check(module, args, kwargs, out, spec=spec):
            inps = spec.input_of(args, kwargs)
            inps, outs = (inps, out) if isinstance(inps, tuple) else ((inps,), (out,))
            assert len(inps) == len(outs), spec.name
            for i, o in zip(inps, outs, strict=True):  # same rows and tokens: the stream's own input
                assert i.shape[:-1] == o.shape[:-1], spec.name
            calls.append(spec.name)
        handles.append(spec.module.register_forward_hook(check, with_kwargs=True))
    try:
        generate(pipe, case)
    finally:
        for h in handles:
            h.remove()
    assert calls == [s.name for s in specs] * STEPS


@pytest.mark.parametrize("cfg_cache", [None, CFGCache(window=(0.0, 0.0))], ids=["plain", "cfg-never-skipping"])
def test_every_step_full_equals_uncached(built, cfg_cache):
    case, pipe, ref = built
    frames, _, st = generate_with_stats(pipe, case, dataclasses.replace(FORA(1, 1), cfg_cache=cfg_cache))
    assert torch.equal(frames, ref)
    assert st.nfc == STEPS and st.flops_fraction == 1.0 and st.uncond_skipped == 0
    assert list(st.contexts) == [case.context]


def test_fastercache_counts_and_is_finite(built):
    case, pipe, ref = built
    frames, _, st = generate_with_stats(pipe, case, FasterCache(interval=2, warmup=2))
    assert frames.shape == ref.shape and torch.isfinite(frames).all() and not torch.equal(frames, ref)
    assert st.full_steps == [0, 1, 3, 5, 7, 9] == Interval(2, 2).full_steps(STEPS)
    # window ceil(0.36 * 10) = 4..9, uncond at 4 and 9
    assert st.contexts[case.context].uncond_skipped_steps == [5, 6, 7, 8]
    assert st.flops_fraction == pytest.approx((6 - 2 / 2) / STEPS)  # full steps 5 and 7 ran half the batch
    assert 0.5 < st.model_flops_fraction < 1


@pytest.mark.parametrize("config", [RFC(target_nfc=4), dataclasses.replace(RFC(target_nfc=4), cfg_cache=CFGCache())],
                         ids=["RFC", "RFC+CFG-Cache"])
def test_rfc_counts_and_is_finite(built, config):
    case, pipe, ref = built
    frames, _, st = generate_with_stats(pipe, case, config)
    assert frames.shape == ref.shape and torch.isfinite(frames).all() and not torch.equal(frames, ref)
    assert st.nfc == 4 and st.full_steps[:2] == [0, 1]
    assert st.uncond_skipped == (4 if config.cfg_cache is not None else 0)


def _low_band_per_frame(x: torch.Tensor) -> torch.Tensor:
    """The low band of every 2-D image in ``x`` (all axes but the last two looped over), with numpy."""
    arr = x.double().numpy()
    h, w = arr.shape[-2:]
    r = min(h, w) // 5
    yy, xx = np.ogrid[:h, :w]
    mask = (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= r * r
    out = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape[:-2]):
        spec = np.fft.fftshift(np.fft.fft2(arr[idx]))
        out[idx] = np.fft.ifft2(np.fft.ifftshift(spec * mask)).real
    return torch.from_numpy(out).to(x.dtype)


@pytest.mark.parametrize("alpha1", [0.0, 0.5])
def test_cfg_cache_rebuilds_the_unconditional_half_per_frame(built, alpha1):
    """At the first skipped step (5) the inputs are still those of the uncached run: the conditional half (second)
    is the model's, the unconditional half (first) is ``cond_5 + d + alpha1 · LF(d)`` with ``d = uncond_4 - cond_4``
    (``w1 = 1 + alpha1`` on the low band of each frame, ``w2 = 1``)."""
    case, pipe, _ = built
    _, ref = generate(pipe, case)
    cfg = CFGCache(window=(0.4, 1.0), alpha1=alpha1, alpha2=0.0, early=1.0)
    _, outs, st = generate_with_stats(pipe, case, dataclasses.replace(FORA(1, 1), cfg_cache=cfg))
    assert st.uncond_skipped == 4
    for i in range(5):
        torch.testing.assert_close(outs[i], ref[i], rtol=0, atol=0)
    u4, c4 = ref[4].chunk(2)
    u5, c5 = outs[5].chunk(2)
    torch.testing.assert_close(c5, ref[5].chunk(2)[1], rtol=1e-4, atol=1e-5)
    d = u4 - c4
    torch.testing.assert_close(u5, c5 + d + alpha1 * _low_band_per_frame(d), rtol=0, atol=1e-5)


def test_guidance_scale_one_leaves_cfg_cache_inert(built):
    case, pipe, _ = built
    plain, _, _ = generate_with_stats(pipe, case, FasterCache(interval=2, warmup=2, cfg=False), guidance=1.0)
    frames, _, st = generate_with_stats(pipe, case, FasterCache(interval=2, warmup=2), guidance=1.0)
    assert torch.equal(frames, plain) and st.uncond_skipped == 0
