"""Tiny offline pipelines of every supported model family: DiT (conftest's ``dit_pipe``), PixArt, SD3, FLUX,
HunyuanVideo, Wan, CogVideoX and Latte as diffusers pipelines, every other family as its bare transformer in
``LoopPipeline``, all built from configs with random weights (nothing is downloaded).

Text encoders are tiny transformers models built from configs; their embeddings are computed here and passed to the
pipelines as ``prompt_embeds`` so no tokenizer (which would need the hub) is involved. ``CASES`` names each family's
pipeline builder, its call arguments and the call contexts its transformer calls run in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
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
from diffusers.models.embeddings import get_2d_rotary_pos_embed
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


WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def wan_pipe(layers: int = 2) -> WanPipeline:
    """Wan 2.1-like with CFG as separate "cond"/"uncond" calls; 1 frame of 32x32 -> 4x4 latents -> 4 tokens."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{**WAN_TINY, "num_layers": layers}, cross_attn_norm=True).eval()
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


def cogvideox_pipe(layers: int = 2) -> CogVideoXPipeline:
    """CogVideoX-like, ``layers`` expert blocks (2), CFG batched unconditional half first; 5 frames of 8x8 -> 2 latent
    frames of 4x4 -> 8 video + 6 text tokens."""
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=16,
        num_layers=layers, sample_width=4, sample_height=4, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
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


# -- families without a tiny pipeline here: the bare transformer in a minimal sampling loop -------------------------
class LoopOutput:
    """What ``generate`` reads: the final latents as ``images``."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images


class LoopPipeline:
    """A minimal diffusers-like pipeline around a bare transformer: flow-matching Euler steps from seeded noise, the
    conditioning fixed (random tensors, built once), no VAE and no text encoder, so a family costs only its tiny
    transformer. Like diffusers' pipelines it calls the scheduler's ``set_timesteps`` first, runs each transformer
    call in a ``cache_context`` (``contexts``: one name, or ``("cond", "uncond")`` for true CFG as separate calls)
    and ends with ``maybe_free_model_hooks``; the output is the final latents.

    ``inputs(latents, t, context)`` gives the transformer's keyword arguments at timestep ``t`` (in [0, 1000]), and
    under the key ``args`` any positional ones;
    ``output(out)`` turns the transformer's first output into the latents' layout (default: itself)."""

    def __init__(self, transformer: Any, inputs: Callable[[torch.Tensor, torch.Tensor, str], dict[str, Any]],
                 shape: tuple[int, ...], contexts: tuple[str, ...] = ("cond",),
                 output: Callable[[Any], torch.Tensor] = lambda out: out, name_calls: bool = True) -> None:
        self.transformer = transformer.eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.inputs, self.shape, self.contexts, self.output = inputs, shape, contexts, output
        self.name_calls = name_calls  # False: no cache_context even where the model has it (as Lumina2, FLUX Kontext)

    def set_progress_bar_config(self, **_: Any) -> None:
        """Nothing to configure (no progress bar)."""

    def maybe_free_model_hooks(self) -> None:
        """The end of a pipeline call (relcache ends its generation here)."""

    @torch.no_grad()
    def __call__(self, num_inference_steps: int, generator: torch.Generator, output_type: str = "np",
                 **_: Any) -> LoopOutput:
        self.scheduler.set_timesteps(num_inference_steps)
        latents = torch.randn(self.shape, generator=generator)
        for t in self.scheduler.timesteps:
            preds = []
            for ctx in self.contexts:
                scope = getattr(self.transformer, "cache_context", None) if self.name_calls else None  # CacheMixin
                with scope(ctx) if scope else contextlib.nullcontext():
                    kwargs = self.inputs(latents, t.expand(latents.shape[0]), ctx)
                    args = kwargs.pop("args", ())  # positional inputs (Z-Image's pipeline passes them so)
                    out = self.transformer(*args, **kwargs, return_dict=False)
                preds.append(self.output(out if isinstance(out, torch.Tensor) else out[0]))  # Kandinsky 5: a tensor
            pred = preds[0] if len(preds) == 1 else preds[1] + 3.0 * (preds[0] - preds[1])  # true CFG, scale 3
            latents = self.scheduler.step(pred, t, latents).prev_sample
        self.maybe_free_model_hooks()
        return LoopOutput(latents.numpy())


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    """Fixed conditioning: a seeded normal tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def no_kwargs() -> dict[str, Any]:
    return {}


def ids_2d(h: int, w: int, axes: int = 3, offset: float = 0.0) -> torch.Tensor:
    """FLUX-style position ids ``(h·w, axes)``: axis 0 the image index (``offset``), then row and column."""
    ids = torch.zeros(h, w, axes)
    ids[..., 0] = offset
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, axes)


def flux2_pipe() -> LoopPipeline:
    """FLUX.2-like (guidance-distilled, fused single-stream blocks): 4x4 latent tokens of 4 channels, 8 text tokens."""
    torch.manual_seed(0)
    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))[None]
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))[None]
    text = randn(1, 8, 16)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids,
        guidance=torch.full_like(t, 3.5)), (1, 16, 4))


def qwen_image_pipe(edit: bool = False) -> LoopPipeline:
    """Qwen-Image-like, true CFG as separate "cond"/"uncond" calls: 4x4 latent tokens (8 channels), 6 text tokens.
    ``edit`` (Qwen-Image-Edit): the reference image's 16 tokens are appended to the noisy latents' (``img_shapes``
    names both grids) and the output's first 16 tokens are the prediction."""
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 2, 2))
    text = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=2)}
    mask = torch.ones(1, 6, dtype=torch.long)
    ref = randn(1, 16, 8, seed=3)
    shapes = [[(1, 4, 4), (1, 4, 4)]] if edit else [[(1, 4, 4)]]

    def inputs(x: torch.Tensor, t: torch.Tensor, ctx: str) -> dict[str, Any]:
        return dict(hidden_states=torch.cat([x, ref], 1) if edit else x, encoder_hidden_states=text[ctx],
                    encoder_hidden_states_mask=mask, timestep=t / 1000, img_shapes=shapes)

    return LoopPipeline(model, inputs, (1, 16, 8), ("cond", "uncond"), output=lambda out: out[:, :16])


def chroma_pipe() -> LoopPipeline:
    """Chroma-like (FLUX.1-schnell derived, no guidance embedding, modulation from an approximator)."""
    torch.manual_seed(0)
    model = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1)
    text, img_ids, txt_ids = randn(1, 6, 16), ids_2d(4, 4), torch.zeros(6, 3)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t / 1000,
                                                     img_ids=img_ids, txt_ids=txt_ids), (1, 16, 4))


def wan_like_pipe(cls: str, **extra: Any) -> LoopPipeline:
    """A Wan-style video transformer: 2 latent frames of 4x4 (4 channels) -> 8 tokens, 6 text tokens, true CFG."""
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**WAN_TINY, **extra)
    text = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=2)}
    control = randn(1, extra.get("vace_in_channels", 1), 2, 4, 4, seed=3)

    def inputs(x: torch.Tensor, t: torch.Tensor, ctx: str) -> dict[str, Any]:
        kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=text[ctx])
        if "vace_layers" in extra:
            kw["control_hidden_states"] = control
        return kw

    return LoopPipeline(model, inputs, (1, 4, 2, 4, 4), ("cond", "uncond"))


def skyreels_v2_pipe() -> LoopPipeline:
    return wan_like_pipe("SkyReelsV2Transformer3DModel")


def wan_vace_pipe() -> LoopPipeline:
    """Wan VACE: control (reference/mask) latents enter through VACE blocks whose hints are added after blocks 0, 1."""
    return wan_like_pipe("WanVACETransformer3DModel", vace_layers=[0, 1], vace_in_channels=4)


def chronoedit_pipe() -> LoopPipeline:
    return wan_like_pipe("ChronoEditTransformer3DModel")


def ltx_pipe() -> LoopPipeline:
    """LTX-Video-like: 2 latent frames of 4x4 (4 channels) as 32 tokens, 6 text tokens."""
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16)
    text, mask = randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, num_frames=2, height=4,
        width=4), (1, 32, 4))


def mochi_pipe() -> LoopPipeline:
    """Mochi-like: asymmetric joint attention (video 16, text 8 wide)."""
    torch.manual_seed(0)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=6)
    text, mask = randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                                     encoder_attention_mask=mask), (1, 4, 2, 4, 4))


def cogview4_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, sample_size=8, pos_embed_max_size=8,
        rope_axes_dim=(4, 4))
    text, size, crop = randn(1, 6, 16), torch.tensor([[16.0, 16.0]]), torch.tensor([[0.0, 0.0]])
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                                     original_size=size, target_size=size, crop_coords=crop),
                        (1, 4, 8, 8))


def flux_like_pipe(cls: str, pooled: int | None = None, **extra: Any) -> LoopPipeline:
    """A FLUX.1-style transformer (Bria, LongCat-Image, Ovis-Image): 4x4 tokens of 4 channels, 6 text tokens."""
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, **extra)
    text, img_ids, txt_ids = randn(1, 6, 16), ids_2d(4, 4), torch.zeros(6, 3)

    def inputs(x: torch.Tensor, t: torch.Tensor, _: str) -> dict[str, Any]:
        kw = dict(hidden_states=x, encoder_hidden_states=text, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids)
        if pooled:
            kw["pooled_projections"] = randn(1, pooled, seed=4)
        return kw

    return LoopPipeline(model, inputs, (1, 16, 4))


def bria_pipe() -> LoopPipeline:
    return flux_like_pipe("BriaTransformer2DModel", axes_dims_rope=[2, 2, 4])


def longcat_image_pipe() -> LoopPipeline:
    return flux_like_pipe("LongCatImageTransformer2DModel", pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])


def ovis_image_pipe() -> LoopPipeline:
    return flux_like_pipe("OvisImageTransformer2DModel", out_channels=4, axes_dims_rope=(2, 2, 4))


def hunyuan_image_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4))
    text, mask = randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                                     encoder_attention_mask=mask), (1, 4, 4, 4))


def hunyuan_video15_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 2, 2), task_type="t2v")
    text, mask = randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long)
    text2, mask2 = randn(1, 4, 8, seed=2), torch.ones(1, 4, dtype=torch.long)
    cond = torch.zeros(1, 5, 2, 4, 4)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=torch.cat([x, cond], 1), timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
        encoder_hidden_states_2=text2, encoder_attention_mask_2=mask2, image_embeds=torch.zeros(1, 3, 8)),
        (1, 4, 2, 4, 4))


def allegro_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=2, caption_channels=16)
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t),
                        (1, 4, 2, 8, 8))


def sana_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8)
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t),
                        (1, 4, 8, 8))


def lumina2_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(16, 16, 16),
        cap_feat_dim=16)
    text, mask = randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=text,
                                                     encoder_attention_mask=mask), (1, 4, 8, 8))


def cosmos_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, text_embed_dim=16,
        adaln_lora_dim=4, max_size=(4, 8, 8), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable")
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                                     ), (1, 4, 2, 8, 8))


def flux_kontext_pipe() -> LoopPipeline:
    """FLUX.1 Kontext-like editing: the reference image's 16 tokens (image index 1 in ``img_ids``) are appended to the
    16 noisy latent tokens; the prediction is the output's first 16 tokens."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    text, pooled, ref = randn(1, 6, 16), randn(1, 16, seed=2), randn(1, 16, 4, seed=3)
    img_ids, txt_ids = torch.cat([ids_2d(4, 4), ids_2d(4, 4, offset=1.0)]), torch.zeros(6, 3)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=torch.cat([x, ref], 1), encoder_hidden_states=text, pooled_projections=pooled,
        timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full_like(t, 2.5)), (1, 16, 4),
        output=lambda out: out[:, :16])


def wan_i2v_pipe() -> LoopPipeline:
    """Wan 2.1 image-to-video-like: the conditioning frame's latents and mask (5 channels) are concatenated to the
    noisy latents' channels, and 4 CLIP image tokens join the text in the cross-attention (``image_dim``)."""
    torch.manual_seed(0)
    tiny = {**WAN_TINY, "in_channels": 9}
    model = WanTransformer3DModel(**tiny, cross_attn_norm=True, image_dim=8, added_kv_proj_dim=16)
    text = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=2)}
    image, cond = randn(1, 4, 8, seed=3), randn(1, 5, 2, 4, 4, seed=4)
    return LoopPipeline(model, lambda x, t, ctx: dict(
        hidden_states=torch.cat([x, cond], 1), timestep=t, encoder_hidden_states=text[ctx],
        encoder_hidden_states_image=image), (1, 4, 2, 4, 4), ("cond", "uncond"))


def glm_image_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, prior_vq_quantizer_codebook_size=32)
    text, size, crop = randn(1, 6, 16), torch.tensor([[16.0, 16.0]]), torch.tensor([[0.0, 0.0]])
    prior = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(5))
    no_drop = torch.zeros(1, 16, dtype=torch.bool)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, prior_token_id=prior, prior_token_drop=no_drop, timestep=t,
        target_size=size, crop_coords=crop), (1, 4, 8, 8))


def helios_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    tiny = {k: v for k, v in WAN_TINY.items() if k != "rope_max_seq_len"}
    model = diffusers.HeliosTransformer3DModel(**tiny, rope_dim=(4, 2, 2))
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t, encoder_hidden_states=text),
                        (1, 4, 2, 4, 4))


def qwen_image21_pipe() -> LoopPipeline:
    """Qwen-Image 2.1-like (one joint sequence, block-causal attention): 2x2 target latents (4 channels) after 4
    text tokens and one vision slot; no KV cache (every step computes the whole sequence)."""
    torch.manual_seed(0)
    model = diffusers.QwenImage21Transformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=8, mlp_ratio=2, axes_dims_rope=(4, 6, 6))
    text, mask = randn(1, 4, 8), torch.ones(1, 4, dtype=torch.long)
    img_mask = torch.zeros(1, 5, dtype=torch.bool)
    img_mask[:, 4:] = True
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t / 1000,
        img_shapes=[[(1, 2, 2)]], img_mask=img_mask), (1, 4, 4), output=lambda out: out[:, -4:])


def wan_animate_pipe() -> LoopPipeline:
    """Wan-Animate-like: 2 latent frames + the reference frame (4 channels, 8 channels of conditioning), pose latents,
    5 face frames (16x16 pixels, motion encoder) through 1 face adapter; 4 CLIP image tokens, 6 text tokens."""
    torch.manual_seed(0)
    model = diffusers.WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, image_dim=8,
        rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16,
        motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2)
    text, image = randn(1, 6, 16), randn(1, 4, 8, seed=2)
    cond, pose, face = randn(1, 8, 3, 4, 4, seed=3), randn(1, 4, 2, 4, 4, seed=4), randn(1, 3, 5, 16, 16, seed=5)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=torch.cat([x, cond], 1), timestep=t, encoder_hidden_states=text,
        encoder_hidden_states_image=image, pose_hidden_states=pose, face_pixel_values=face), (1, 4, 3, 4, 4))


def framepack_pipe() -> LoopPipeline:
    """HunyuanVideo Framepack-like: 2 latent frames of 4x4 (patch 2), the clean and history latents and image tokens
    of the previous sections."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True)
    text, mask, pooled, image = randn(1, 6, 16), torch.ones(1, 6), randn(1, 8, seed=2), randn(1, 4, 16, seed=3)
    clean, h2, h4 = randn(1, 4, 1, 4, 4, seed=4), randn(1, 4, 1, 4, 4, seed=5), randn(1, 4, 4, 4, 4, seed=6)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
        pooled_projections=pooled, guidance=torch.full_like(t, 6000.0), image_embeds=image,
        indices_latents=torch.arange(1, 3), latents_clean=clean, indices_latents_clean=torch.zeros(1),
        latents_history_2x=h2, indices_latents_history_2x=torch.full((1,), 3), latents_history_4x=h4,
        indices_latents_history_4x=torch.arange(4, 8)), (1, 4, 2, 4, 4))


def minimax_h3_pipe() -> LoopPipeline:
    """MiniMax-H3-like: one packed sequence of 4 text, 2 audio (fixed) and 32 video rows (the latents, 16 channels)."""
    torch.manual_seed(0)
    model = diffusers.MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1, ffn_dim=32,
        in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
        time_embed_dim=16, rope_freq_dim=2)
    text, audio = randn(1, 4, 8), randn(1, 2, 6, seed=2)
    tags = torch.tensor([1] * 4 + [2] * 2 + [0] * 32)
    pos = torch.zeros(38, 3)
    pos[:, 0] = torch.arange(38.0)
    pos[6:, 1], pos[6:, 2] = torch.arange(32.0) // 4 % 4, torch.arange(32.0) % 4
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=text, timestep=t / 1000,
        timestep_indices=torch.zeros(38, dtype=torch.long), token_tags=tags, position_ids=pos,
        video_indices=torch.arange(6, 38), audio_indices=torch.arange(4, 6), text_indices=torch.arange(4)),
        (1, 32, 16))


def ace_step_pipe() -> LoopPipeline:
    """ACE-Step-like (audio): 8 latent frames of 8 channels, 8 frames of context latents, 10 text tokens."""
    torch.manual_seed(0)
    model = diffusers.AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, sliding_window=16)
    text, context = randn(1, 10, 32), randn(1, 8, 16, seed=2)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, timestep=t / 1000, timestep_r=t / 1000, encoder_hidden_states=text,
        context_latents=context), (1, 8, 8))


def unzero(model: torch.nn.Module, cls_suffix: str, std: float = 0.2) -> torch.nn.Module:
    """``model`` with the linear layers inside its ``*<cls_suffix>`` modules drawn at random (seeded): diffusers
    zero-initialises some modulation tables, whose blocks would then add nothing, so caching could not change the
    output."""
    gen = torch.Generator().manual_seed(7)
    for module in model.modules():
        if type(module).__name__.endswith(cls_suffix):
            for lin in (m for m in module.modules() if isinstance(m, torch.nn.Linear)):
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
                    if lin.bias is not None:
                        lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * std)
    return model


def kandinsky5_pipe() -> LoopPipeline:
    """Kandinsky 5-like: 2 latent frames of 4x4 (4 channels, channels last), 6 text tokens through the text blocks,
    true CFG as separate calls."""
    torch.manual_seed(0)
    model = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 2, 2))
    unzero(model, "Modulation")  # zero-initialised: the blocks would add nothing
    text = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=2)}
    pooled = randn(1, 8, seed=3)
    rope = [torch.arange(2), torch.arange(2), torch.arange(2)]
    return LoopPipeline(model, lambda x, t, ctx: dict(
        hidden_states=x, encoder_hidden_states=text[ctx], pooled_projections=pooled, timestep=t / 1000,
        visual_rope_pos=rope, text_rope_pos=torch.arange(6)), (1, 2, 4, 4, 4), ("cond", "uncond"))


def motif_video_pipe() -> LoopPipeline:
    """Motif-Video-like: 2 latent frames of 4x4 (4 channels, 5 of image conditioning), 6 text tokens; text
    cross-attention in both kinds of block; the last single block is a decoder layer (attending to the encoder
    layers' output instead of the text)."""
    torch.manual_seed(0)
    model = diffusers.MotifVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1, num_single_layers=2,
        num_decoder_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", norm_type="layer_norm",
        text_embed_dim=16, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)
    text, cond = randn(1, 6, 16), randn(1, 5, 2, 4, 4, seed=2)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=torch.cat([x, cond], 1), encoder_hidden_states=text, timestep=t), (1, 4, 2, 4, 4))


def hidream_pipe() -> LoopPipeline:
    """HiDream-I1-like: 8x8 latents (4 channels, patch 2: 16 tokens), T5 and two Llama layers' text (8 tokens each),
    mixture-of-experts feed-forwards (2 routed experts)."""
    torch.manual_seed(0)
    model = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(8, 8), llama_layers=(0, 1, 2), force_inference_output=True)
    t5, llama, pooled = randn(1, 8, 8), randn(3, 1, 8, 4, seed=2), randn(1, 8, seed=3)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, timesteps=t, encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama,
        pooled_embeds=pooled), (1, 4, 8, 8))


def z_image_pipe() -> LoopPipeline:
    """Z-Image-like: the latents as a list of one (4, 1, 8, 8) tensor (patch 2: 16 tokens) and 8 caption tokens,
    passed positionally with ``t`` rising from 0 to 1, as Z-Image's pipeline passes them."""
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[4, 2, 2], axes_lens=[64, 16, 16])
    with torch.no_grad():  # random adaLN tables at full scale swing every feature with t (RFC's probe moves > 30 %
        for name, module in model.named_modules():  # per step, so RFC(threshold=0.3) computed every step): calmer
            if name.endswith("adaLN_modulation"):
                for p in module.parameters():
                    p.mul_(0.3)
    text = randn(8, 16)
    return LoopPipeline(model, lambda x, t, _: dict(args=(list(x.unbind(0)), 1 - t / 1000, [text])), (1, 4, 1, 8, 8),
                        output=lambda out: torch.stack(out))


def nucleus_moe_pipe() -> LoopPipeline:
    """Nucleus-MoE-Image-like: 4x4 latent tokens (16 channels, patch 2 packed), 8 text tokens; 2 layers, the second
    a mixture of 4 experts with a shared expert (its router reads the timestep and the unmodulated norm). Width 48:
    the dense MLP's width rounds down to a multiple of 128 (zero below 48). Capacity 4: each expert takes every token
    (weighted by its routing score); at capacity 1 each takes its top quarter, a choice that flips between steps of
    this random model (RFC 0.076 from full, 1.4x nearer than FORA(8, 1))."""
    torch.manual_seed(0)
    model = diffusers.NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=True, num_experts=4, moe_intermediate_dim=16,
        capacity_factors=4.0, dense_moe_strategy="leave_first_block_dense")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # the experts' weights are allocated uninitialised (torch.empty), left to a checkpoint
        for name, module in model.named_modules():
            if type(module).__name__ == "SwiGLUExperts":
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-2] ** -0.5)
            if name.endswith("img_mod"):  # random adaLN tables at full scale swing the features with t (as Z-Image)
                for p in module.parameters():
                    p.mul_(0.3)
    text, mask = randn(1, 8, 16), torch.ones(1, 8, dtype=torch.long)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t / 1000,
        img_shapes=[(1, 4, 4)]), (1, 16, 16))


def ltx2_pipe(layers: int = 2) -> LoopPipeline:
    """LTX-2-like audio+video: 2 latent frames of 4x4 (4 channels) as 32 tokens, 5 audio frames (fixed), 6 text
    tokens for each modality; ``layers`` blocks."""
    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=layers, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False)
    text, audio_text, audio = randn(1, 6, 16), randn(1, 6, 16, seed=2), randn(1, 5, 4, seed=3)
    mask = torch.ones(1, 6, dtype=torch.bool)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=text, audio_encoder_hidden_states=audio_text,
        timestep=t, encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=2, height=4, width=4,
        audio_num_frames=5, fps=25.0), (1, 32, 4))


def kandinsky6_pipe() -> LoopPipeline:
    """Kandinsky 6-like text+image to video+audio: 2 latent frames of 4x4 (4 channels, channels last), 6 audio frames
    (fixed), 6 text tokens through each branch's text blocks, true CFG as separate calls."""
    torch.manual_seed(0)
    model = diffusers.Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 2, 2), visual_cond=False,
        in_audio_dim=4, out_audio_dim=4)
    text = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=2)}
    pooled, audio = randn(1, 8, seed=3), randn(1, 6, 4, seed=4)
    return LoopPipeline(model, lambda x, t, ctx: dict(
        hidden_states=x, encoder_hidden_states=text[ctx], pooled_projections=pooled, timestep=t / 1000,
        audio_hidden_states=audio), (1, 2, 4, 4, 4), ("cond", "uncond"))


def sana_wm_refiner_pipe() -> LoopPipeline:
    """SANA-WM's LTX-2-based refiner, video only: one block of 2 latent frames of 4x4 (4 channels) as 32 tokens, 6
    text tokens, plain attention (no KV cache: the pipeline's capture calls are extra calls, tested apart)."""
    torch.manual_seed(0)
    model = diffusers.SanaWMLTX2RefinerTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=16, rope_double_precision=False)
    text, mask = randn(1, 6, 16), torch.ones(1, 6)
    rope = model.build_rotary_emb_for_absolute_positions(1, [0, 1], 4, 4, torch.device("cpu"), 24.0)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, timestep=t[:, None].expand(1, 32), video_rotary_emb=rope,
        encoder_attention_mask=mask), (1, 32, 4))


def sana_video_pipe() -> LoopPipeline:
    """SANA-Video-like: 2 latent frames of 4x4 (4 channels, patch 2: 8 tokens), 6 text tokens."""
    torch.manual_seed(0)
    model = diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False,
        norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t),
                        (1, 4, 2, 4, 4))


def bria_fibo_pipe() -> LoopPipeline:
    """Bria FIBO-like (FLUX-style layout; each block's text is the projected text-encoder layer of its own): 4x4
    latent tokens of 4 channels, 6 text tokens."""
    torch.manual_seed(0)
    model = diffusers.BriaFiboTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, text_encoder_dim=8, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])
    text = randn(1, 6, 16)
    layers = [text[:, :, :8]] * 3
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, img_ids=ids_2d(4, 4), txt_ids=torch.zeros(6, 3),
        timestep=t / 1000, text_encoder_layers=layers), (1, 16, 4))


def hunyuan_dit_pipe() -> LoopPipeline:
    """HunyuanDiT-like: 8x8 latents (4 channels, patch 2: 16 tokens), 4 CLIP and 4 T5 text tokens, 2D RoPE as its
    pipeline builds it; 4 blocks, so the last one takes the long skip from the first. Learned sigma: the first 4 of
    the 8 output channels are the prediction."""
    torch.manual_seed(0)
    model = diffusers.HunyuanDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate")
    clip, t5, mask = randn(1, 4, 8), randn(1, 4, 8, seed=2), torch.ones(1, 4)
    meta, style = torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]), torch.zeros(1, dtype=torch.long)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, timestep=t, encoder_hidden_states=clip, text_embedding_mask=mask,
        encoder_hidden_states_t5=t5, text_embedding_mask_t5=mask, image_meta_size=meta, style=style,
        image_rotary_emb=rope), (1, 4, 8, 8), output=lambda out: out[:, :4])


def auraflow_pipe() -> LoopPipeline:
    """AuraFlow-like: 8x8 latents (4 channels, patch 2: 16 tokens), 6 text tokens after the 8 register tokens; one
    MMDiT block and two single blocks."""
    torch.manual_seed(0)
    model = diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16, out_channels=4, pos_embed_max_size=16)
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t / 1000),
                        (1, 4, 8, 8))


def flux3_pipe(reference: bool = True) -> LoopPipeline:
    """FLUX.3-like: 4x4 latent tokens of 4 channels, 6 text tokens; one mode block per mode and two single blocks.
    ``reference`` (image-to-image): 4 tokens of a 2x2 reference image, whose mode blocks then run."""
    torch.manual_seed(0)
    model = diffusers.Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(2, 2, 2, 2))
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1)).float()
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(6)).float()
    ref_ids = torch.cartesian_prod(torch.arange(1), torch.arange(2), torch.arange(2), torch.tensor([-1])).float()
    text, ref = randn(1, 6, 16), randn(1, 4, 4, seed=2)

    def inputs(x: torch.Tensor, t: torch.Tensor, _: str) -> dict[str, Any]:
        kw = dict(hidden_states=x, encoder_hidden_states=text, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids)
        if reference:
            kw.update(image_cond_hidden_states=ref, image_cond_ids=ref_ids)
        return kw

    return LoopPipeline(model, inputs, (1, 16, 4))


def cogview3plus_pipe() -> LoopPipeline:
    torch.manual_seed(0)
    model = diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8)
    text, size, crop = randn(1, 6, 16), torch.tensor([[64.0, 64.0]]), torch.tensor([[0.0, 0.0]])
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                                     original_size=size, target_size=size, crop_coords=crop),
                        (1, 4, 8, 8))


def krea2_pipe() -> LoopPipeline:
    """Krea 2-like: 4x4 latent tokens of 16 channels after 4 text tokens (3 tapped text-encoder layers, the last
    token padding), grouped-query attention (4 heads, 2 key-value heads)."""
    torch.manual_seed(0)
    model = diffusers.Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2))
    text, mask = randn(1, 4, 3, 16), torch.tensor([[True, True, True, False]])
    ids = torch.cat([torch.zeros(4, 3), torch.cat([torch.zeros(16, 1), ids_2d(4, 4)[:, 1:]], 1)])
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t / 1000,
                                                     position_ids=ids, encoder_attention_mask=mask), (1, 16, 16))


def ideogram4_pipe() -> LoopPipeline:
    """Ideogram 4-like: one packed sequence of 4 text tokens then 4x4 image tokens (16 channels); ``t`` rising from
    0 (noise) to 1 as its pipeline passes it."""
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    torch.manual_seed(0)
    model = diffusers.Ideogram4Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32, adaln_dim=16,
        llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1))
    text = torch.cat([randn(1, 4, 24), torch.zeros(1, 16, 24)], 1)
    image_pos = torch.cat([torch.zeros(16, 1), ids_2d(4, 4)[:, 1:]], 1).long() + IMAGE_POSITION_OFFSET
    pos = torch.cat([torch.arange(4)[:, None].expand(4, 3), image_pos])[None]
    indicator = torch.tensor([[LLM_TOKEN_INDICATOR] * 4 + [OUTPUT_IMAGE_INDICATOR] * 16])
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=torch.cat([torch.zeros(1, 4, 16), x], 1), timestep=1 - t / 1000, encoder_hidden_states=text,
        position_ids=pos, segment_ids=torch.ones(1, 20, dtype=torch.long), indicator=indicator),
        (1, 16, 16), output=lambda out: out[:, 4:])


def easyanimate_pipe() -> LoopPipeline:
    """EasyAnimate-like: 2 latent frames of 8x8 (4 channels, patch 2: 32 tokens), 6 text tokens; 2 MMDiT blocks and a
    third without a text MLP (its ff runs once per stream)."""
    torch.manual_seed(0)
    model = diffusers.EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=4, patch_size=2, num_layers=3,
        mmdit_layers=2, text_embed_dim=16, time_embed_dim=8)
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t, encoder_hidden_states=text),
                        (1, 4, 2, 8, 8))


def omnigen_pipe() -> LoopPipeline:
    """OmniGen-like (a Phi-3-style decoder over [condition tokens; time token; image tokens]): 8x8 latents (4
    channels, patch 2: 16 tokens), 2 condition tokens, the second a 2x2 input image's patch; the timestep rising from
    0 (noise) to 1 as its scheduler (invert_sigmas, num_train_timesteps=1) gives it. Without adaLN, RCS's probe (the
    first layer's normed input) is near linear in the latents and moves little: with 3 condition tokens instead of 2,
    RFC(threshold=0.3) computes no step past warm-up (the contract asks for one)."""
    torch.manual_seed(0)
    model = diffusers.OmniGenTransformer2DModel(
        hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, num_layers=2,
        pad_token_id=0, vocab_size=64, in_channels=4, time_step_dim=8,
        rope_scaling={"long_factor": [1.0] * 4, "short_factor": [1.0] * 4})
    ids, image = torch.randint(1, 64, (1, 2), generator=torch.Generator().manual_seed(1)), randn(1, 4, 2, 2, seed=2)
    seq = 2 + 1 + 16
    cond = dict(input_ids=ids, input_img_latents=[image], input_image_sizes={0: [[1, 2]]},
                attention_mask=torch.ones(1, seq, seq), position_ids=torch.arange(seq)[None])
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=1 - t / 1000, **cond), (1, 4, 8, 8))


def prx_pipe() -> LoopPipeline:
    """PRX-like: 8x8 latents (4 channels, patch 2: 16 tokens) attending to 6 text tokens as extra keys and values,
    the timestep in [0, 1] as its pipeline passes it. Random adaLN weights: diffusers initialises them to zero."""
    torch.manual_seed(0)
    model = diffusers.PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=16,
                                            mlp_ratio=2.0, num_heads=2, depth=2, axes_dim=[4, 4])
    with torch.no_grad():  # the blocks' adaLN starts at zero (every gate 0: the blocks would do nothing)
        for block in model.blocks:
            block.modulation.lin.weight.normal_(0, 0.3)
    text, mask = randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=text,
                                                     attention_mask=mask), (1, 4, 8, 8))


def consisid_pipe() -> LoopPipeline:
    """ConsisID-like (CogVideoX with identity conditioning): 2 latent frames of 8x8 (4 channels, patch 2: 32
    tokens) after 6 text tokens, a face embedding and one ViT layer through the local facial extractor, its perceiver
    cross-attention after every block."""
    torch.manual_seed(0)
    model = diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, cross_attn_interval=1, is_kps=False, is_train_face=True,
        cross_attn_dim_head=4, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8,
        LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1)
    text, face, vit = randn(1, 6, 16), randn(1, 2, seed=2), [randn(1, 2, 2, seed=3)]
    return LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                                     id_cond=face, id_vit_hidden=vit), (1, 2, 4, 8, 8))


def joyimage_edit_plus_pipe() -> LoopPipeline:
    """JoyImage-Edit Plus-like: the target's 4x4 patches (4 channels, patch (1, 2, 2), as its pipeline patchifies
    them) then a 2x2-patch reference image's, 6 text tokens; the output's first 16 patches are the prediction."""
    torch.manual_seed(0)
    model = diffusers.JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=16, num_layers=2,
        rope_dim_list=[2, 2, 4])
    text, mask, ref = randn(1, 6, 16), torch.ones(1, 6), randn(1, 4, 4, 1, 2, 2, seed=2)
    shapes = [[(1, 4, 4), (1, 2, 2)]]
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=torch.cat([x, ref], 1), timestep=t, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
        shape_list=shapes), (1, 16, 4, 1, 2, 2), output=lambda out: out[:, :16])


def transformer_2d_pipe() -> LoopPipeline:
    """The generic Transformer2DModel in a PixArt-style patched config built directly (from_pretrained remaps DiT and
    PixArt configs to their own classes): 8x8 latents (4 channels, patch 2: 16 tokens), 6 text tokens; learned sigma,
    so the first 4 of the 8 output channels are the prediction."""
    torch.manual_seed(0)
    model = diffusers.Transformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    text = randn(1, 6, 16)
    return LoopPipeline(model, lambda x, t, _: dict(
        hidden_states=x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None,
                                                                                     "aspect_ratio": None}),
        (1, 4, 8, 8), output=lambda out: out[:, :4])


def joyimage_edit_pipe() -> LoopPipeline:
    """JoyImage-Edit-like: a reference image and the target as the two items of one (1, 2, 4, 1, 8, 8) tensor (4
    channels, patch (1, 2, 2): 16 tokens each; the model puts the target's first), 6 text tokens for the prompt and 4
    for the negative prompt. As JoyImageEditPipeline, the model input is formed once per step and both calls, the
    negative prompt's second, get that very tensor without a call context; the output's last item is the target's."""
    torch.manual_seed(0)
    model = diffusers.JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=16, num_layers=2,
        rope_dim_list=[2, 2, 4])
    texts, ref = {"cond": randn(1, 6, 16), "uncond": randn(1, 4, 16, seed=5)}, randn(1, 1, 4, 1, 8, 8, seed=2)
    step: dict[str, torch.Tensor] = {}

    def inputs(x: torch.Tensor, t: torch.Tensor, ctx: str) -> dict[str, Any]:
        if ctx == "cond":  # a step's first call
            step["latents"] = torch.cat([ref, x], 1)
        return dict(hidden_states=step["latents"], timestep=t, encoder_hidden_states=texts[ctx])

    return LoopPipeline(model, inputs, (1, 1, 4, 1, 8, 8), ("cond", "uncond"), output=lambda out: out[:, -1:])


def bria_fibo2_pipe() -> LoopPipeline:
    """Bria FIBO 2-like (Z-Image's blocks): 8x8 latents (4 channels, patch 2: 16 tokens) and a 4x4 context image to
    edit (4 tokens), 3 layers, the second an injection block; the text as bundles of 16-wide features (the perceiver's,
    then the injection block's), 6 tokens (8 gist tokens) for the prompt and 4 (4 gist tokens) for the negative prompt,
    run as a second call per step on the same latents and timestep without a call context, as BriaFibo2Pipeline runs
    CFG. Width 24: the feed-forward's width rounds down to a multiple of 64 (zero below 24). The injection blocks'
    cross-attention gate starts at zero in diffusers (the cross-attention would do nothing): set to 1. The adaLN
    tables scaled by 0.3 as Z-Image's (RFC(4 of 8) 0.12 from full at full scale, FORA(8, 1) only 2.2x farther)."""
    torch.manual_seed(0)
    model = diffusers.BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=24, n_layers=3, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=12, axes_dims=(4, 4, 4), axes_lens=(16, 8, 8))
    with torch.no_grad():
        model.layers[1].cross_attn_gate.fill_(1.0)
        for name, module in model.named_modules():
            if name.endswith("adaLN_modulation"):
                for p in module.parameters():
                    p.mul_(0.3)
    texts = {"cond": randn(1, 2, 6, 16), "uncond": randn(1, 2, 4, 16, seed=5)}
    context = [randn(1, 4, 4, 4, seed=2)]
    return LoopPipeline(model, lambda x, t, ctx: dict(hidden_states=x, timestep=t / 1000,
                                                      encoder_hidden_states=texts[ctx], context_latents=context),
                        (1, 4, 8, 8), ("cond", "uncond"))


def cosmos3_pipe(layers: int = 2) -> LoopPipeline:
    """Cosmos 3 Omni-like: one packed sequence without a batch axis, the prompt's text tokens (5; the negative
    prompt's 3, as the "uncond" call) then a 4x4 vision latent's tokens (4 channels, patch 1: 16 tokens), ``layers``
    layers, with the per-call inputs Cosmos3OmniPipeline builds (indexes of each modality in the sequence, 3-axis
    position ids, one timestep per noisy vision token)."""
    torch.manual_seed(0)
    model = diffusers.Cosmos3OmniTransformer(
        head_dim=8, hidden_act="silu", hidden_size=16, intermediate_size=32, latent_channel=4, latent_patch_size=1,
        num_attention_heads=2, num_hidden_layers=layers, num_key_value_heads=1, patch_latent_dim=4, rms_norm_eps=1e-5,
        rope_axes_dim=[2, 1, 1], rope_theta=1e4, vocab_size=32)
    texts = {"cond": torch.tensor([1, 2, 3, 4, 5]), "uncond": torch.tensor([7, 8, 9])}

    def inputs(x: torch.Tensor, t: torch.Tensor, ctx: str) -> dict[str, Any]:
        ids = texts[ctx]
        n_text, n = len(ids), x.shape[-2] * x.shape[-1]
        vision = torch.arange(n_text, n_text + n)
        return dict(input_ids=ids, text_indexes=torch.arange(n_text), und_len=n_text, sequence_length=n_text + n,
                    position_ids=torch.arange(n_text + n).expand(3, -1).clone(), vision_tokens=[x],
                    vision_token_shapes=[(1, *x.shape[-2:])], vision_sequence_indexes=vision,
                    vision_mse_loss_indexes=vision, vision_timesteps=t[:1].expand(n).clone(),
                    vision_noisy_frame_indexes=[torch.tensor([0])])

    return LoopPipeline(model, inputs, (1, 4, 1, 4, 4), ("cond", "uncond"), output=lambda out: out[0])


@dataclass(frozen=True)
class Case:
    build: Callable[..., Any]  # some take ``layers`` (the compile tests trace fewer blocks)
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
    # the bare transformer in LoopPipeline (no VAE, no text encoder): contexts as LoopPipeline names them
    "flux2": Case(flux2_pipe, no_kwargs, ("cond",)),
    "qwen_image": Case(qwen_image_pipe, no_kwargs, ("cond", "uncond")),
    "qwen_image_edit": Case(functools.partial(qwen_image_pipe, edit=True), no_kwargs, ("cond", "uncond")),
    "chroma": Case(chroma_pipe, no_kwargs, ("cond",)),
    "bria": Case(bria_pipe, no_kwargs, ("cond",)),
    "longcat_image": Case(longcat_image_pipe, no_kwargs, ("cond",)),
    "ovis_image": Case(ovis_image_pipe, no_kwargs, ("cond",)),
    "hunyuan_image": Case(hunyuan_image_pipe, no_kwargs, ("cond",)),
    "hunyuan_video15": Case(hunyuan_video15_pipe, no_kwargs, ("cond",)),
    "mochi": Case(mochi_pipe, no_kwargs, ("cond",)),
    "cogview4": Case(cogview4_pipe, no_kwargs, ("cond",)),
    "ltx": Case(ltx_pipe, no_kwargs, ("cond",)),
    "allegro": Case(allegro_pipe, no_kwargs, ("cond",)),
    "sana": Case(sana_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "cosmos": Case(cosmos_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "lumina2": Case(lumina2_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "skyreels_v2": Case(skyreels_v2_pipe, no_kwargs, ("cond", "uncond")),
    "chronoedit": Case(chronoedit_pipe, no_kwargs, ("cond", "uncond")),
    "wan_vace": Case(wan_vace_pipe, no_kwargs, ("cond", "uncond")),
    "flux_kontext": Case(flux_kontext_pipe, no_kwargs, ("cond",)),  # FLUX.1 with reference-image tokens
    "wan_i2v": Case(wan_i2v_pipe, no_kwargs, ("cond", "uncond")),  # Wan with image tokens in the cross-attention
    "glm_image": Case(glm_image_pipe, no_kwargs, ("cond",)),
    "helios": Case(helios_pipe, no_kwargs, ("cond",)),
    "qwen_image21": Case(qwen_image21_pipe, no_kwargs, ("cond",)),
    "wan_animate": Case(wan_animate_pipe, no_kwargs, ("cond",)),
    "framepack": Case(framepack_pipe, no_kwargs, ("cond",)),
    "minimax_h3": Case(minimax_h3_pipe, no_kwargs, ("cond",)),
    "ace_step": Case(ace_step_pipe, no_kwargs, ("cond",)),
    "kandinsky5": Case(kandinsky5_pipe, no_kwargs, ("cond", "uncond")),
    "motif_video": Case(motif_video_pipe, no_kwargs, ("cond",)),
    "hidream": Case(hidream_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "z_image": Case(z_image_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "nucleus_moe": Case(nucleus_moe_pipe, no_kwargs, ("cond",)),
    "ltx2": Case(ltx2_pipe, no_kwargs, ("cond",)),
    "kandinsky6": Case(kandinsky6_pipe, no_kwargs, ("cond", "uncond")),
    "sana_wm_refiner": Case(sana_wm_refiner_pipe, no_kwargs, ("cond",)),
    "sana_video": Case(sana_video_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "bria_fibo": Case(bria_fibo_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "hunyuan_dit": Case(hunyuan_dit_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "auraflow": Case(auraflow_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "flux3": Case(flux3_pipe, no_kwargs, ("default",)),  # image-to-image (all modules); no CacheMixin
    "cogview3plus": Case(cogview3plus_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "krea2": Case(krea2_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "ideogram4": Case(ideogram4_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "easyanimate": Case(easyanimate_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "omnigen": Case(omnigen_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "prx": Case(prx_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "consisid": Case(consisid_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    "joyimage_edit_plus": Case(joyimage_edit_plus_pipe, no_kwargs, ("default",)),  # no CacheMixin
    "transformer_2d": Case(transformer_2d_pipe, no_kwargs, ("default",)),  # no CacheMixin: no cache_context
    # no CacheMixin, true CFG as two calls per step in no cache_context: relcache names them "default", "default.2"
    "bria_fibo2": Case(bria_fibo2_pipe, no_kwargs, ("default", "default.2")),
    "joyimage_edit": Case(joyimage_edit_pipe, no_kwargs, ("default", "default.2")),
    # one packed sequence without a batch axis; CFG as "cond" and "uncond" calls
    "cosmos3": Case(cosmos3_pipe, no_kwargs, ("cond", "uncond")),
}

#: families whose transformer class the installed diffusers lacks (added after the oldest diffusers relcache
#: supports): their rows stay registered (a model of a class that does not exist never matches) and go untested
NEWER_THAN_INSTALLED = {name for name, cls in (("kandinsky6", "Kandinsky6Transformer3DModel"),
                                               ("sana_wm_refiner", "SanaWMLTX2RefinerTransformer3DModel"),
                                               ("flux3", "Flux3Transformer2DModel"),
                                               ("bria_fibo2", "BriaFibo2Transformer2DModel"))
                        if not hasattr(diffusers, cls)}
for _name in NEWER_THAN_INSTALLED:
    del CASES[_name]
