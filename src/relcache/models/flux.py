"""Adapter for diffusers' FLUX.1 (``FluxTransformer2DModel``): dual-stream blocks, then single-stream blocks.

Dual-stream ``FluxTransformerBlock``: ``attn`` is the joint attention, called on the modulated norms of the image
and text streams and returning ``(image_out, text_out)`` before the gates; ``ff`` (image MLP) and ``ff_context``
(text MLP) are called on their modulated norms. All three are cached; the joint attention's two outputs are each
paired with their own stream's input.

Single-stream ``FluxSingleTransformerBlock`` runs ``proj_mlp`` and ``attn`` side by side on one modulated norm of the
concatenated text+image sequence, then ``proj_out`` on the concatenation ``[attn_out, act_mlp(proj_mlp(x))]`` and
the gate. ``attn`` (the attention without output projection) and ``proj_mlp`` (the MLP's first, larger matmul) are
cached: they are the only separately called modules whose input is the modulated norm. **Not cached**: ``act_mlp``
(elementwise, cheap) and ``proj_out``, the output projection shared by both branches (not separable per branch),
which runs at every step: ``5d^2`` of the single block's ``12d^2`` multiply-adds per token in linear layers.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Blocks, ModelRow, SpatialGrid, TableAdapter, register_row


class FluxAdapter(TableAdapter):
    """Caches FLUX's joint attention, image and text MLPs, and the single blocks' attention and MLP input matmul;
    gives CFG-Cache the latent grid of FLUX's packed tokens."""

    default_row = ModelRow(
        "FLUX.1 (dev, schnell, Kontext, Fill)", "FluxPipeline, FluxKontextPipeline, FluxFillPipeline",
        ("FluxTransformer2DModel",),
        (Blocks("transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "single_stream")),
    )

    def spatial_grid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SpatialGrid | None:
        """FLUX outputs packed tokens ``(B, h·w, C)`` in row-major order of the latent grid, whose row and column
        are columns 1 and 2 of ``img_ids``: CFG-Cache's FFT runs over ``(h, w)``. None where ``img_ids`` does not
        describe exactly one row-major grid of the output's tokens (e.g. reference-image tokens appended by
        Kontext): the FFT then runs over the output's last two axes. Copies ``img_ids`` to the host (a sync on a
        GPU), only at CFG-Cache's store and rebuild steps."""
        ids = kwargs.get("img_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim not in (2, 3) or ids.shape[-1] < 3 or ids.is_meta:
            return None
        ids = (ids[0] if ids.ndim == 3 else ids).detach().to("cpu")  # older diffusers gave img_ids a batch dim
        tokens = ids.shape[0]
        h, w = (int(v) + 1 for v in ids[:, 1:3].amax(dim=0).tolist()) if tokens else (0, 0)
        if h * w != tokens:
            return None
        grid = torch.stack([torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)], dim=1)
        if not torch.equal(ids[:, 1:3].long(), grid) or not (ids[:, 0] == ids[0, 0]).all():
            return None  # not one row-major grid (e.g. Kontext's reference-image tokens appended)

        def to_grid(x: torch.Tensor) -> torch.Tensor:
            if x.ndim != 3 or x.shape[1] != tokens:
                raise ValueError(f"expected FLUX tokens of shape (B, {tokens}, C), got {tuple(x.shape)}")
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

        def to_tokens(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], x.shape[1], h * w).transpose(1, 2)

        return to_grid, to_tokens


register_row(adapter_class=FluxAdapter)
