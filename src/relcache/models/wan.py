"""Adapter for diffusers' Wan 2.1 / 2.2 (``WanTransformer3DModel``).

Each ``WanTransformerBlock`` calls ``attn1`` (self-attention with RoPE) on the modulated norm, ``attn2``
(cross-attention to the text, and to the image tokens for image-to-video) on the optionally normed residual stream
(no modulation, no gate), and ``ffn`` on the modulated norm; outputs are taken before gates and residual adds.
Wan 2.2's two-expert pipelines (``transformer_2``) switch transformers mid-generation: relcache caches
``pipe.transformer`` only; enable it on ``pipe.transformer_2`` separately (with ``begin_generation``) if needed.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, CachedModule, modules_of_blocks, register_adapter

WAN_BLOCK_MODULES = (("attn1", "attn"), ("attn2", "cross_attn"), ("ffn", "mlp"))


class WanAdapter(Adapter):
    """Caches every block's self-attention, cross-attention and feed-forward."""

    model_classes = ("WanTransformer3DModel",)

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        return modules_of_blocks(model.blocks, "blocks", WAN_BLOCK_MODULES)


register_adapter(WanAdapter())
