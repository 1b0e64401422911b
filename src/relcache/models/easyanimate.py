"""Adapter for diffusers' EasyAnimate (``EasyAnimateTransformer3DModel``): blocks of two kinds in one list.

Every block calls ``attn1``, the joint attention, on the modulated norms of the video and text streams (norm1, one
adaLN-zero per stream) and returns ``(video_out, text_out)`` before the gates. Its first ``mmdit_layers`` blocks
(every block in the released configs) are MMDiT blocks: ``ff`` on the video stream's modulated norm and ``txt_ff`` on
the text stream's, each once, outputs before the optional after-norm (``norm3``) and the gates. The other blocks
have no ``txt_ff`` and call ``ff`` twice, once per stream, so there only ``attn1`` is cached (CogView4's case).
Code because a row's slots cannot depend on another attribute of the block.
"""

from __future__ import annotations

from torch import nn

from .base import Blocks, CachedModule, ModelRow, TableAdapter, register_row


class EasyAnimateAdapter(TableAdapter):
    """Caches each block's joint attention, and the per-stream feed-forwards of the MMDiT blocks."""

    default_row = ModelRow("EasyAnimate", "EasyAnimatePipeline, EasyAnimateInpaintPipeline, "
                           "EasyAnimateControlPipeline", ("EasyAnimateTransformer3DModel",),
                           (Blocks("transformer_blocks", "joint_attn_ff_txt_ff"),))

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        """The row's modules, less ``ff`` in blocks without ``txt_ff`` (called once per stream there)."""
        shared_ff = {f"transformer_blocks.{i}.ff" for i, block in enumerate(model.transformer_blocks)
                     if getattr(block, "txt_ff", None) is None}
        return [m for m in super().cached_modules(model) if m.name not in shared_ff]


register_row(adapter_class=EasyAnimateAdapter)
