"""Adapter for diffusers' HiDream-I1 (``HiDreamImageTransformer2DModel``): double- then single-stream blocks, each
wrapped in a ``HiDreamBlock`` whose ``block`` is the real one.

Double-stream block: ``attn1`` is the joint attention over the modulated norms of the image stream and of the text
stream (the T5 and first Llama tokens, plus this block's own Llama layer's tokens), called positionally as
``attn1(norm_hidden_states, hidden_states_masks, norm_encoder_hidden_states)`` and returning ``(image_out, text_out)``;
``ff_i`` and ``ff_t`` (mixture-of-experts SwiGLU feed-forwards) get the image and text streams' modulated norms.
Single-stream block: ``attn1`` and ``ff_i`` on the modulated norm of one image+text sequence (its text tail is
replaced by the next Llama layer's tokens at every block). All are cached; each feed-forward's router runs inside
the cached module, so a forecast step skips it too. Code because the joint attention's text stream is its third
positional argument (the shape table's joint input reads the second) and the timestep is ``timesteps=``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .base import Blocks, CachedModule, ModelRow, Slot, TableAdapter, register_row


def hidream_joint_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm_hidden_states, norm_encoder_hidden_states)`` of a HiDream joint attention, by keyword or position
    (the second positional argument is the image mask)."""
    hidden = kwargs["norm_hidden_states"] if "norm_hidden_states" in kwargs else args[0]
    text = kwargs["norm_encoder_hidden_states"] if "norm_encoder_hidden_states" in kwargs else args[2]
    return hidden, text


class HiDreamAdapter(TableAdapter):
    """Caches HiDream's joint attention and both streams' feed-forwards, and the single blocks' attention and
    feed-forward."""

    default_row = ModelRow(
        "HiDream-I1", "HiDreamImagePipeline", ("HiDreamImageTransformer2DModel",),
        (Blocks("double_stream_blocks", (Slot("block.attn1", "attn", joint=True), Slot("block.ff_i", "mlp"),
                                         Slot("block.ff_t", "mlp"))),
         Blocks("single_stream_blocks", (Slot("block.attn1", "attn"), Slot("block.ff_i", "mlp")))),
    )

    #: HiDreamImagePipeline joins the negative and positive Llama embeddings on dim 1: (layers, batch, tokens, dim)
    batch_axes = {"encoder_hidden_states_llama3": 1}

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        return [replace(m, input_of=hidream_joint_inputs) if m.name.startswith("double_stream_blocks.")
                and m.name.endswith(".attn1") else m for m in super().cached_modules(model)]

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """HiDream's transformer takes its timestep as ``timesteps=`` (or second positionally)."""
        if "timesteps" in kwargs:
            return kwargs["timesteps"]
        return args[1] if len(args) > 1 else None


register_row(adapter_class=HiDreamAdapter)
