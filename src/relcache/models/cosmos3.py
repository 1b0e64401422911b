"""Adapter for diffusers' Cosmos 3 Omni (``Cosmos3OmniTransformer``): a mixture of transformers over one packed
sequence of text (understanding) tokens, then generated (vision, sound, action) tokens, without a batch axis.

Each of ``layers`` runs its joint ``self_attn`` on the two streams' RMS norms, ``(und, gen)``, returning one output
per stream (the text stream attends causally to itself only; the generation stream to both), then one MLP per
stream: ``mlp`` on the text, ``mlp_moe_gen`` on the generation stream. All three are cached. The tensors are
``(tokens, dim)``, one sample per call (the pipeline runs CFG as "cond" and "uncond" calls), so the row says
``batched=False``: the runtime sees each with a leading axis of one. RCS's probe is the attention's second input,
the generation stream: the text stream is the same at every step (the prompt at no noise), so it would never show
the generation move. Code because the call's latents are the list ``vision_tokens`` and its timestep is
``vision_timesteps`` (one per noisy vision token, all equal).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Blocks, ModelRow, Slot, TableAdapter, register_row

#: the joint attention (its generation stream read by RCS), then each stream's MLP
MOT_LAYER = (Slot("self_attn", "attn", joint=True, probe=1), Slot("mlp", "mlp"), Slot("mlp_moe_gen", "mlp"))


class Cosmos3Adapter(TableAdapter):
    """Caches every layer's joint attention and both streams' MLPs."""

    default_row = ModelRow("Cosmos 3 Omni", "Cosmos3OmniPipeline", ("Cosmos3OmniTransformer",),
                           (Blocks("layers", MOT_LAYER),), batched=False)

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The vision tokens' timesteps (``vision_timesteps``), or None."""
        return kwargs.get("vision_timesteps")

    def hidden_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The first vision latent, ``(1, C, T, H, W)`` (``vision_tokens`` is a list of them)."""
        tokens = kwargs["vision_tokens"] if "vision_tokens" in kwargs else args[5]
        return tokens[0]


register_row(adapter_class=Cosmos3Adapter)
