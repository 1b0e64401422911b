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

from typing import Any

import torch
from torch import nn

from .base import Adapter, CachedModule, register_adapter


def video_and_text_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the joint attention, ``(norm_video, norm_text)``, paired with its ``(video_out, text_out)``."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if "encoder_hidden_states" in kwargs:
        text = kwargs["encoder_hidden_states"]
    else:
        text = args[0 if "hidden_states" in kwargs else 1]
    return hidden, text


class CogVideoXAdapter(Adapter):
    """Caches every block's joint attention (video and text outputs) and its feed-forward."""

    model_classes = ("CogVideoXTransformer3DModel",)
    cfg_cond_first = False  # CogVideoXPipeline: prompt_embeds = cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        out = []
        for i, block in enumerate(model.transformer_blocks):
            out.append(CachedModule(f"transformer_blocks.{i}.attn1", block.attn1, "attn", video_and_text_inputs))
            out.append(CachedModule(f"transformer_blocks.{i}.ff", block.ff, "mlp"))
        return out


register_adapter(CogVideoXAdapter())
