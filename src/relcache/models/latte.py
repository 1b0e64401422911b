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

from .base import BASIC_BLOCK_MODULES, Adapter, CachedModule, modules_of_layers, refuse_ff_chunking, register_adapter

TEMPORAL_MODULES = (("attn1", "attn"), ("ff", "mlp"))  # temporal blocks have no cross-attention


class LatteAdapter(Adapter):
    """Caches the spatial blocks' self-attention, cross-attention and feed-forward and the temporal blocks'
    self-attention and feed-forward, interleaved in execution order (spatial ``i``, then temporal ``i``)."""

    model_classes = ("LatteTransformer3DModel",)
    cfg_cond_first = False  # LattePipeline: prompt_embeds = cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        spatial, temporal = model.transformer_blocks, model.temporal_transformer_blocks
        refuse_ff_chunking((*spatial, *temporal))
        return modules_of_layers(
            (spatial, "transformer_blocks", BASIC_BLOCK_MODULES),
            (temporal, "temporal_transformer_blocks", TEMPORAL_MODULES),
        )


register_adapter(LatteAdapter())
