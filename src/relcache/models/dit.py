"""Adapter for diffusers' DiT (``DiTTransformer2DModel``, the DiT-XL/2 design with adaLN-zero blocks).

Each ``BasicTransformerBlock`` calls ``attn1`` on the modulated norm of the residual stream, optionally
``attn2`` (cross-attention), then ``ff`` on the modulated norm, and applies gates and residuals itself.
"""

from __future__ import annotations

from torch import nn

from .base import Blocks, ModelRow, TableAdapter, register_row


class DiTAdapter(TableAdapter):
    """Caches every block's self-attention, cross-attention (if any) and feed-forward; computes the per-block copies
    of the timestep-and-class embedding once per call."""

    # DiTPipeline batches CFG conditional half first: cat([latents] * 2) with labels cat([class_labels, class_null])
    default_row = ModelRow("DiT", "DiTPipeline", ("DiTTransformer2DModel",), (Blocks("transformer_blocks", "basic"),),
                           refuse_chunking=True, cfg_cond_first=True)

    def shared_modules(self, model: nn.Module) -> list[list[nn.Module]]:
        """Every block's adaLN-zero embedding of timestep and class (``norm1.emb``): the converted DiT
        checkpoints copy the original DiT's one embedder into each block, and the final layer calls block 0's."""
        embs = [b.norm1.emb for b in model.transformer_blocks if getattr(getattr(b, "norm1", None), "emb", None)]
        return [embs] if len(embs) > 1 else []


register_row(adapter_class=DiTAdapter)
