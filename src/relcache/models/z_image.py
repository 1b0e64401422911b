"""Adapter for diffusers' Z-Image (``ZImageTransformer2DModel``): one image+text sequence through ``layers``.

The transformer takes its latents and captions as lists (one tensor per sample), embeds and refines each (the noise
refiner on the image tokens, the context refiner on the caption tokens: small, run at every step), then runs the
main ``layers`` on the unified sequence: ``attention`` and ``feed_forward`` on its adaLN-modulated RMS norms
(before the post-norms and gates), cached. The transformer's list input is read through ``first_tensor_input``
(its first tensor); CFG-Cache's batched half-batch step does not cut lists, so on Z-Image CFG-Cache never finds a
CFG batch and leaves the call alone. Code because the timestep is ``t`` and rises through a generation
(``t = (1000 - timestep) / 1000``): the runtime's rule "a larger timestep starts a generation" reads ``1 - t``.
"""

from __future__ import annotations

from typing import Any

from .base import Blocks, ModelRow, TableAdapter, register_row


class ZImageAdapter(TableAdapter):
    """Caches Z-Image's main layers' attention and feed-forward; the refiners run at every step."""

    default_row = ModelRow("Z-Image", "ZImagePipeline, ZImageImg2ImgPipeline, ZImageOmniPipeline",
                           ("ZImageTransformer2DModel",), (Blocks("layers", "attention_feed_forward"),))

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The noise level ``1 - t`` (Z-Image's ``t``, second positionally, rises from 0 to 1), or None."""
        t = kwargs["t"] if "t" in kwargs else (args[1] if len(args) > 1 else None)
        return None if t is None else 1 - t


register_row(adapter_class=ZImageAdapter)
