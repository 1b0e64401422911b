"""Adapter for diffusers' Latte (``LatteTransformer3DModel``): spatial and temporal ``BasicTransformerBlock`` pairs.

Layer ``i`` runs the spatial block ``transformer_blocks[i]`` on every frame (batch ``B·F``, tokens = patches:
``attn1`` self-attention, ``attn2`` cross-attention to the text, ``ff``), then the temporal block
``temporal_transformer_blocks[i]`` on every patch position (batch ``B·P``, tokens = frames: ``attn1``, ``ff``).
The blocks use ``ada_norm_single``: ``attn1`` and ``ff`` receive the modulated norm of the residual stream and
return their output before the block's gate; ``attn2`` receives the residual stream itself. Both leading
dimensions are batch-major (``b·F + f``, ``b·P + p``), so per-sample norms never mix videos or CFG halves.
The transformer returns ``(B, C, F, H, W)``.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import Adapter, CachedModule, register_adapter

SPATIAL_MODULES = (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "mlp"))
TEMPORAL_MODULES = (("attn1", "attn"), ("ff", "mlp"))
PREFIXES = ("transformer_blocks", "temporal_transformer_blocks")


class LatteAdapter(Adapter):
    """Caches the spatial blocks' self-attention, cross-attention and feed-forward and the temporal blocks'
    self-attention and feed-forward, interleaved in execution order (spatial ``i``, then temporal ``i``)."""

    model_classes = ("LatteTransformer3DModel",)
    cfg_cond_first = False  # LattePipeline: prompt_embeds = cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        spatial, temporal = model.transformer_blocks, model.temporal_transformer_blocks
        for block in (*spatial, *temporal):
            if getattr(block, "_chunk_size", None) is not None:
                raise ConfigError(
                    "feed-forward chunking (set_chunk_feed_forward) calls ff several times per step; "
                    "disable it (chunk_size=None) before enabling relcache"
                )
        out = []
        for i, pair in enumerate(zip(spatial, temporal, strict=True)):
            for block, prefix, attrs in zip(pair, PREFIXES, (SPATIAL_MODULES, TEMPORAL_MODULES), strict=True):
                for attr, kind in attrs:
                    module = getattr(block, attr, None)
                    if module is not None:
                        out.append(CachedModule(f"{prefix}.{i}.{attr}", module, kind))
        return out


register_adapter(LatteAdapter())
