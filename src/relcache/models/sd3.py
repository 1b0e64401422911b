"""Adapter for diffusers' Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, MMDiT ``JointTransformerBlock``).

Each block calls ``attn``, the joint attention, on the modulated norms of the image and text streams (it returns
``(image_out, text_out)`` before the gates); SD3.5's dual-attention blocks also call ``attn2``, an image-only
self-attention, on a second modulated norm; then ``ff`` and ``ff_context`` on their modulated norms. All are
cached. In the last block (``context_pre_only``) the text stream has no MLP and the joint attention's text output
is discarded by the block: it is still returned by ``attn``, so it is cached too (a small, text-length tensor).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, CachedModule, modules_of_blocks, refuse_ff_chunking, register_adapter, with_joint_inputs

SD3_BLOCK_MODULES = (("attn", "attn"), ("attn2", "attn"), ("ff", "mlp"), ("ff_context", "mlp"))


class SD3Adapter(Adapter):
    """Caches every MMDiT block's joint attention, SD3.5's extra attention, and both MLPs."""

    model_classes = ("SD3Transformer2DModel",)
    cfg_cond_first = False  # the pipeline batches torch.cat([negative_prompt_embeds, prompt_embeds])

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        refuse_ff_chunking(model.transformer_blocks)
        return with_joint_inputs(modules_of_blocks(model.transformer_blocks, "transformer_blocks", SD3_BLOCK_MODULES))

    def extra_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """SD3.5's skip-layer guidance calls the transformer a second time at some steps, with ``skip_layers``."""
        return bool(kwargs.get("skip_layers"))


register_adapter(SD3Adapter())
