"""Tiny offline pipelines of every supported model family: DiT (conftest's ``dit_pipe``), PixArt, SD3, FLUX,
HunyuanVideo, Wan, CogVideoX and Latte, built from configs with random weights (nothing is downloaded).

Text encoders are tiny transformers models built from configs; their embeddings are computed here and passed to the
pipelines as ``prompt_embeds`` so no tokenizer (which would need the hub) is involved. ``CASES`` names each family's
pipeline builder, its call arguments and the call contexts its transformer calls run in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from conftest import dit_pipe
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LattePipeline,
    LatteTransformer3DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402

import relcache

STEPS = 8


# -- tiny text encoders: embeddings of fixed token ids -------------------------------------------------------------
@functools.cache
def t5_embeds(dim: int, seq: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings of a tiny T5 encoder, each (1, seq, dim)."""
    torch.manual_seed(seed)
    enc = T5EncoderModel(T5Config(vocab_size=64, d_model=dim, d_ff=2 * dim, d_kv=8, num_layers=1, num_heads=2)).eval()
    ids = torch.randint(1, 64, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = enc(ids).last_hidden_state
    return out[:1].clone(), out[1:].clone()


@functools.cache
def clip_pooled(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) pooled embeddings of a tiny CLIP text encoder with projection, each (1, dim)."""
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=dim, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1)
    enc = CLIPTextModelWithProjection(cfg).eval()
    ids = torch.randint(1, 63, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = enc(ids).text_embeds
    return out[:1].clone(), out[1:].clone()


def _vae2d(latent_channels: int, **kw: Any) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(4, 4), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=2, sample_size=16, **kw,
    ).eval()


# -- the pipelines ---------------------------------------------------------------------------------------------------
def quiet(pipe: Any) -> Any:
    """``pipe`` without its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_kwargs() -> dict[str, Any]:
    """DiTPipeline (conftest's ``dit_pipe``): class-conditional, CFG batched conditional half first."""
    return dict(class_labels=[1, 7], guidance_scale=1.5)


def flux_pipe() -> FluxPipeline:
    """FLUX.1-dev-like: guidance-distilled (guidance embedding, no CFG); 16x16 image -> 8x8 latents -> 16 tokens."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()
    vae = _vae2d(2, shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False)
    return quiet(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                              text_encoder_2=None, tokenizer_2=None, transformer=transformer))


def flux_kwargs(size: int = 16) -> dict[str, Any]:
    return dict(prompt_embeds=t5_embeds(16)[0], pooled_prompt_embeds=clip_pooled(16)[0], guidance_scale=3.5,
                height=size, width=size, max_sequence_length=6)


def sd3_pipe() -> StableDiffusion3Pipeline:
    """SD3-like MMDiT with CFG batched (one transformer call per step); 16x16 image -> 8x8 latents -> 16 tokens."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,),  # SD3.5's extra attention in block 0
    ).eval()
    vae = _vae2d(4, shift_factor=0.1, scaling_factor=1.5)
    return quiet(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    ))


def sd3_kwargs() -> dict[str, Any]:
    (emb, neg), (pool, npool) = t5_embeds(16), clip_pooled(16)
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=pool,
                negative_pooled_prompt_embeds=npool, guidance_scale=4.0, height=16, width=16)


def pixart_pipe() -> PixArtSigmaPipeline:
    """PixArt-sigma-like with CFG batched; 16x16 image -> 8x8 latents -> 16 tokens, learned sigma (8 channels out)."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    vae = _vae2d(4)
    return quiet(PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=DDIMScheduler()))


def pixart_kwargs() -> dict[str, Any]:
    emb, neg = t5_embeds(16)
    mask = torch.ones(1, emb.shape[1], dtype=torch.long)
    return dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=mask, negative_prompt=None, guidance_scale=4.5, height=16, width=16,
                use_resolution_binning=False)


def hunyuan_pipe() -> HunyuanVideoPipeline:
    """HunyuanVideo-like with true CFG as separate "cond"/"uncond" calls; 1 frame of 16x16 -> 2x2 latents."""
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=16, rope_axes_dim=(2, 2, 4),
    ).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        norm_num_groups=2, scaling_factor=0.5, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False,
    ).eval()
    return quiet(HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                      scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None,
                                      tokenizer_2=None))


def hunyuan_kwargs() -> dict[str, Any]:
    (emb, neg), (pool, npool) = t5_embeds(16), clip_pooled(16)
    mask = torch.ones(1, emb.shape[1], dtype=torch.long)
    return dict(prompt_embeds=emb, pooled_prompt_embeds=pool, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=npool, negative_prompt_attention_mask=mask, true_cfg_scale=3.0,
                guidance_scale=6.0, height=16, width=16, num_frames=1)


def wan_pipe() -> WanPipeline:
    """Wan 2.1-like with CFG as separate "cond"/"uncond" calls; 1 frame of 32x32 -> 4x4 latents -> 4 tokens."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return quiet(WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(),
                             scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer))


def wan_kwargs() -> dict[str, Any]:
    emb, neg = t5_embeds(16)
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=5.0, height=32, width=32, num_frames=1)


def latte_pipe() -> LattePipeline:
    """Latte-like, 2 layers (spatial + temporal), CFG batched unconditional half first; 4 frames of 16x16 -> 8x8
    latents -> 16 patches per frame."""
    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=4,
        attention_bias=True,
    ).eval()
    return quiet(LattePipeline(tokenizer=None, text_encoder=None, vae=_vae2d(4), transformer=transformer,
                               scheduler=DDIMScheduler()))


def latte_kwargs() -> dict[str, Any]:
    emb, neg = t5_embeds(16)
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, negative_prompt=None, guidance_scale=4.0,
                height=16, width=16, video_length=4)


def cogvideox_pipe() -> CogVideoXPipeline:
    """CogVideoX-like, 2 expert blocks, CFG batched unconditional half first; 5 frames of 8x8 -> 2 latent frames of
    4x4 -> 8 video + 6 text tokens."""
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
    return quiet(CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=CogVideoXDDIMScheduler()))


def cogvideox_kwargs() -> dict[str, Any]:
    emb, neg = t5_embeds(16)
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=6.0, height=8, width=8, num_frames=5,
                max_sequence_length=6)


@dataclass(frozen=True)
class Case:
    build: Callable[[], Any]
    kwargs: Callable[[], dict[str, Any]]
    contexts: tuple[str, ...]  # the call contexts the pipeline's transformer calls run in


CASES = {
    "dit": Case(dit_pipe, dit_kwargs, ("default",)),
    "flux": Case(flux_pipe, flux_kwargs, ("cond",)),  # FluxPipeline names its (only) call "cond"
    "sd3": Case(sd3_pipe, sd3_kwargs, ("default",)),
    "pixart": Case(pixart_pipe, pixart_kwargs, ("default",)),
    "hunyuan_video": Case(hunyuan_pipe, hunyuan_kwargs, ("cond", "uncond")),
    "wan": Case(wan_pipe, wan_kwargs, ("cond", "uncond")),
    "cogvideox": Case(cogvideox_pipe, cogvideox_kwargs, ("cond_uncond",)),
    "latte": Case(latte_pipe, latte_kwargs, ("default",)),
}


def generate(pipe: Any, case: Case, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    out = pipe(**case.kwargs(), num_inference_steps=steps, generator=torch.manual_seed(seed), output_type="np")
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def generate_with_stats(pipe: Any, case: Case, steps: int = STEPS) -> tuple[np.ndarray, relcache.CacheStats]:
    """Output and the stats as they stand after the last transformer call of the generation.

    Read from a forward hook: every pipeline ends its call by freeing the caches (``maybe_free_model_hooks``), so
    ``relcache.stats(pipe)`` read after the call reports the same steps but ``cache_bytes`` 0 (test_contract.py
    compares the two).
    """
    seen: list[relcache.CacheStats] = []
    handle = pipe.transformer.register_forward_hook(lambda *_: seen.append(relcache.stats(pipe)))
    try:
        out = generate(pipe, case, steps)
    finally:
        handle.remove()
    return out, seen[-1]
