"""Adapter for diffusers' HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream then single-stream blocks.

Dual-stream blocks: ``attn`` is the joint attention of the video and text streams (returns ``(video_out, text_out)``
before the gates), ``ff`` and ``ff_context`` the video and text MLPs, each called on its modulated norm.

Single-stream blocks run ``proj_mlp`` and ``attn`` on one modulated norm of the concatenated video+text sequence
(``attn`` gets it split back into the two streams and returns the two attention outputs, with no output
projection), then ``proj_out`` on ``[attn_out, act_mlp(proj_mlp(x))]`` and the gate. ``proj_mlp`` and ``attn`` are
cached; ``proj_out``, the output projection shared by both branches, is **not** (it is not separable per branch)
and runs at every step, like ``act_mlp``. The token-replace variants (``image_condition_type="token_replace"``) have
the same module layout. The text refiner (``context_embedder``) is small and runs on text only: not cached.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, CachedModule, dual_then_single_stream_modules, register_adapter


class HunyuanVideoAdapter(Adapter):
    """Caches the joint attention and both MLPs of dual blocks, and the attention and MLP matmul of single blocks."""

    model_classes = ("HunyuanVideoTransformer3DModel",)

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        return dual_then_single_stream_modules(model, joint_single=True)  # single blocks' attn: both streams


register_adapter(HunyuanVideoAdapter())
