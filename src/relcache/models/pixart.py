"""Adapter for diffusers' PixArt-alpha and PixArt-sigma (``PixArtTransformer2DModel``).

Blocks are ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: ``attn1`` gets the norm of the residual
stream scaled and shifted by the shared adaLN-single table, ``attn2`` (cross-attention to the T5 tokens) gets the
residual stream itself with no norm (PixArt's design; there is no gate either), and ``ff`` gets the modulated
norm; every module's output is taken before its gate and residual add.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import Adapter, CachedModule, modules_of_blocks, register_adapter
from .dit import BASIC_BLOCK_MODULES


class PixArtAdapter(Adapter):
    """Caches every block's self-attention, cross-attention and feed-forward."""

    model_classes = ("PixArtTransformer2DModel",)
    cfg_cond_first = False  # PixArt pipelines: prompt_embeds = cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        if any(getattr(block, "_chunk_size", None) is not None for block in model.transformer_blocks):
            raise ConfigError(
                "feed-forward chunking (set_chunk_feed_forward) calls ff several times per step; "
                "disable it (chunk_size=None) before enabling relcache"
            )
        return modules_of_blocks(model.transformer_blocks, "transformer_blocks", BASIC_BLOCK_MODULES)


register_adapter(PixArtAdapter())
