"""Adapter for diffusers' OmniGen (``OmniGenTransformer2DModel``): a Phi-3-style decoder over one sequence.

The sequence is [condition tokens (the prompt's text, with the input images' patches in place of their
placeholders); a time token; the noisy image's tokens]. Each of ``layers`` calls ``self_attn`` on an RMS norm of the
residual stream (its keys and values from the same norm) and ``mlp`` on an RMS norm of the attention residual;
both outputs are added ungated (no adaLN: the timestep reaches the blocks as the time token). Both are cached.
The pipeline batches CFG conditional half first; with input images it adds a third, image-only part, so the batch
is not two equal halves and CFG-Cache leaves those calls alone. Code because the timestep rises through a
generation (its scheduler inverts the sigmas: 0 at the noise, towards 1 at the end), so the runtime's rule "a larger
timestep starts a generation" (a loop that marks none) reads ``1 - timestep``.
"""

from __future__ import annotations

from typing import Any

from .base import Blocks, ModelRow, TableAdapter, register_row


class OmniGenAdapter(TableAdapter):
    """Caches each decoder layer's self-attention and MLP."""

    default_row = ModelRow("OmniGen", "OmniGenPipeline", ("OmniGenTransformer2DModel",),
                           (Blocks("layers", "self_attn_mlp"),), cfg_cond_first=True)

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The noise level ``1 - timestep`` (second positionally; OmniGen's rises from 0 to 1), or None."""
        t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        return None if t is None else 1 - t


register_row(adapter_class=OmniGenAdapter)
