"""Adapter for diffusers' Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, MMDiT ``JointTransformerBlock``).

Each block calls ``attn``, the joint attention, on the modulated norms of the image and text streams (it returns
``(image_out, text_out)`` before the gates); SD3.5's dual-attention blocks also call ``attn2``, an image-only
self-attention, on a second modulated norm; then ``ff`` and ``ff_context`` on their modulated norms. All are
cached. In the last block (``context_pre_only``) the text stream has no MLP and the joint attention's text output
is discarded by the block: it is still returned by ``attn``, so it is cached too (a small, text-length tensor).
"""

from __future__ import annotations

from typing import Any

from .base import Blocks, ModelRow, TableAdapter, register_row


class SD3Adapter(TableAdapter):
    """Caches every MMDiT block's joint attention, SD3.5's extra attention, and both MLPs; leaves skip-layer
    guidance's extra calls alone."""

    # the pipeline batches CFG unconditional half first: torch.cat([negative_prompt_embeds, prompt_embeds])
    default_row = ModelRow("Stable Diffusion 3 / 3.5", "StableDiffusion3Pipeline", ("SD3Transformer2DModel",),
                           (Blocks("transformer_blocks", "mmdit"),), refuse_chunking=True)

    def extra_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """SD3.5's skip-layer guidance calls the transformer a second time at some steps, with ``skip_layers``."""
        return bool(kwargs.get("skip_layers"))


register_row(adapter_class=SD3Adapter)
