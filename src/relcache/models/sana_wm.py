"""Adapter for SANA-WM's refiner (``SanaWMLTX2RefinerTransformer3DModel``): LTX-2's video blocks, run block-
autoregressively with a sliding-window KV cache.

Each block calls ``attn1`` (self-attention; with the pipeline's KV cache its queries also attend to the cached sink
and history keys), ``attn2`` (cross-attention to the text) and ``ff`` on the video stream's modulated norms: the
``basic`` shape. The refiner pipeline denoises one block of frames at a time, its scheduler's ``set_timesteps``
starting each block's generation, with ``kv_cache_mode="inject"`` (the cache is only read). Its other calls,
``capture_pre_rope`` (seed the attention sink from clean latents) and ``inject_and_capture_post_rope`` (record the
refined block's keys and values into the history), are not denoising steps and must run every module (a skipped
``attn1`` would record nothing): they are extra calls, run as the plain model.
"""

from __future__ import annotations

from typing import Any

from .base import Blocks, ModelRow, TableAdapter, register_row

#: the KV-cache modes in which a call records keys and values instead of taking a denoising step
CAPTURE_MODES = ("capture_pre_rope", "inject_and_capture_post_rope")


class SanaWMRefinerAdapter(TableAdapter):
    """Caches the refiner's attentions and feed-forward at its denoising steps; leaves its KV-capture calls alone."""

    default_row = ModelRow("SANA-WM refiner", "SanaWMLTX2Refiner", ("SanaWMLTX2RefinerTransformer3DModel",),
                           (Blocks("transformer_blocks", "basic"),))

    def extra_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """A call that captures keys and values into the refiner's KV cache (``kv_cache_mode`` a capture mode)."""
        return kwargs.get("kv_cache_mode") in CAPTURE_MODES


register_row(adapter_class=SanaWMRefinerAdapter)
