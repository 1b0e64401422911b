"""Adapter for diffusers' DiT (``DiTTransformer2DModel``, the DiT-XL/2 design with adaLN-zero blocks).

Each ``BasicTransformerBlock`` calls ``attn1`` on the modulated norm of the residual stream, optionally
``attn2`` (cross-attention), then ``ff`` on the modulated norm, and applies gates and residuals itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Blocks, ModelRow, Modulation, TableAdapter, register_row


def _class_labels(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``class_labels`` argument of ``DiTTransformer2DModel.forward``."""
    return kwargs["class_labels"] if "class_labels" in kwargs else (args[2] if len(args) > 2 else None)


def _timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``timestep`` argument of ``DiTTransformer2DModel.forward``."""
    return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)


class DiTAdapter(TableAdapter):
    """Caches every block's self-attention and feed-forward (DiT's blocks have no cross-attention); computes the
    per-block copies of the timestep-and-class embedding once per call."""

    # DiTPipeline batches CFG conditional half first: cat([latents] * 2) with labels cat([class_labels, class_null])
    default_row = ModelRow("DiT", "DiTPipeline", ("DiTTransformer2DModel",),
                           (Blocks("transformer_blocks", "self_attn_ff"),), refuse_chunking=True, cfg_cond_first=True)

    def shared_modules(self, model: nn.Module) -> list[list[nn.Module]]:
        """Every block's adaLN-zero embedding of timestep and class (``norm1.emb``): the converted DiT
        checkpoints copy the original DiT's one embedder into each block, and the final layer calls block 0's."""
        embs = [b.norm1.emb for b in model.transformer_blocks if getattr(getattr(b, "norm1", None), "emb", None)]
        return [embs] if len(embs) > 1 else []

    def modulation(self, model: nn.Module) -> Modulation | None:
        """Every block's adaLN-zero projection (``norm1.linear``, of ``silu(norm1.emb(t, class))``) and the final
        layer's (``proj_out_1``, of block 0's embedding): all depend only on the timestep and the class labels."""
        blocks = list(model.transformer_blocks)
        norms = [getattr(b, "norm1", None) for b in blocks]
        if not blocks or not all(isinstance(getattr(n, "linear", None), nn.Linear) and getattr(n, "emb", None)
                                 for n in norms) or not isinstance(getattr(model, "proj_out_1", None), nn.Linear):
            return None
        sources = list({id(n.emb): n.emb for n in norms}.values())  # distinct: the final layer calls block 0's
        feeds = [sources.index(n.emb) for n in norms] + [sources.index(norms[0].emb)]  # each projection's source

        def outputs(timesteps: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
            """Each embedding's output at every step, ``(T·B, hidden)`` step-major."""
            labels = _class_labels(args, kwargs)
            t = _timestep(args, kwargs)
            batch = max(labels.shape[0] if isinstance(labels, torch.Tensor) else 1, t.reshape(-1).shape[0])
            steps = timesteps.repeat_interleave(batch)  # (T·B,) step-major
            rows = labels.reshape(-1).expand(batch).repeat(len(timesteps)) if labels is not None else None
            dtype = norms[0].linear.weight.dtype  # read per table: the model may be cast after ``enable``
            return [emb(steps, rows, hidden_dtype=dtype) for emb in sources]

        def inputs(timesteps: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                   embs: list[torch.Tensor] | None) -> list[torch.Tensor]:
            """The projections' inputs from the embeddings' outputs, which the runtime computed (``sources``)."""
            assert embs is not None, "DiT's table always has sources"
            acts = [F.silu(e) for e in embs]
            return [acts[i] for i in feeds]

        return Modulation(
            projections=(*(n.linear for n in norms), model.proj_out_1), inputs=inputs, timestep=_timestep,
            conditioning=lambda args, kwargs: tuple(
                x for x in (_class_labels(args, kwargs),) if isinstance(x, torch.Tensor)),
            sources=tuple(sources), source_outputs=outputs,
        )


register_row(adapter_class=DiTAdapter)
