"""Adapter for diffusers' PixArt-alpha and PixArt-sigma (``PixArtTransformer2DModel``).

Blocks are ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: ``attn1`` gets the norm of the residual
stream scaled and shifted by the shared adaLN-single table, ``attn2`` (cross-attention to the T5 tokens) gets the
residual stream itself with no norm (PixArt's design; there is no gate either), and ``ff`` gets the modulated
norm; every module's output is taken before its gate and residual add.
"""

from __future__ import annotations

from torch import nn

from .base import BASIC_BLOCK_MODULES, Adapter, CachedModule, modules_of_blocks, refuse_ff_chunking, register_adapter


class PixArtAdapter(Adapter):
    """Caches every block's self-attention, cross-attention and feed-forward."""

    model_classes = ("PixArtTransformer2DModel",)
    cfg_cond_first = False  # PixArt pipelines: prompt_embeds = cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        refuse_ff_chunking(model.transformer_blocks)
        return modules_of_blocks(model.transformer_blocks, "transformer_blocks", BASIC_BLOCK_MODULES)


register_adapter(PixArtAdapter())
