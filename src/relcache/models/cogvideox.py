"""Adapter for diffusers' CogVideoX (``CogVideoXTransformer3DModel``): expert blocks over joint text+video tokens.

Each ``CogVideoXBlock`` computes ``norm1`` (``CogVideoXLayerNormZero``: LayerNorm modulated by the timestep, one
shift/scale per stream) of the video and text streams, calls the joint attention
``attn1(hidden_states=norm_video, encoder_hidden_states=norm_text, ...)``, which returns
``(video_out, text_out)`` before the block's gates, then ``norm2`` and ``ff`` on the concatenation
``[norm_text; norm_video]`` of the modulated norms, and applies the gates and residuals itself. Both are cached:
the attention's two outputs each paired with their own stream's input, the feed-forward as one module over the
joint sequence. The transformer returns ``(B, F, C, H, W)``.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, CachedModule, modules_of_blocks, register_adapter, with_joint_inputs

COGVIDEOX_BLOCK_MODULES = (("attn1", "attn"), ("ff", "mlp"))


class CogVideoXAdapter(Adapter):
    """Caches every block's joint attention (video and text outputs) and its feed-forward."""

    model_classes = ("CogVideoXTransformer3DModel",)
    cfg_cond_first = False  # CogVideoXPipeline: prompt_embeds = cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        modules = modules_of_blocks(model.transformer_blocks, "transformer_blocks", COGVIDEOX_BLOCK_MODULES)
        return with_joint_inputs(modules, ("attn1",))  # attn1: (norm_video, norm_text), paired with its two outputs


register_adapter(CogVideoXAdapter())
