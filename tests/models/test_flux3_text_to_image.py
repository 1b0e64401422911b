"""FLUX.3 text-to-image: without reference images the transformer leaves the reference images' mode blocks, which
the adapter lists (families.py's contract case is image-to-image, where they run), uncalled. Caching still computes
every step exactly when told to, and RFC keeps its budget (tiny model: families.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
if not hasattr(__import__("diffusers"), "Flux3Transformer2DModel"):  # added after the oldest supported diffusers
    pytest.skip("this diffusers has no Flux3Transformer2DModel", allow_module_level=True)

from families import flux3_pipe  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC  # noqa: E402
from relcache.models import find_adapter  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def text_to_image() -> tuple[Any, np.ndarray]:
    """The tiny FLUX.3 without reference images, and its uncached output."""
    pipe = flux3_pipe(reference=False)
    return pipe, pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images


def test_reference_blocks_are_listed_but_not_called(text_to_image):
    pipe, _ = text_to_image
    listed = [s.name for s in find_adapter(pipe.transformer).cached_modules(pipe.transformer)]
    assert "mode_blocks.image_cond.0.attn" in listed
    called: list[str] = []
    handles = [pipe.transformer.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: called.append(n))
               for n in listed]
    try:
        pipe(num_inference_steps=1, generator=torch.manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    assert called == [n for n in listed if not n.startswith("mode_blocks.image_cond.")]


def test_every_step_full_is_exact(text_to_image):
    pipe, ref = text_to_image
    with relcache.cached(pipe, FORA(1, 1)):
        out = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
        st = relcache.stats(pipe)
    assert (out == ref).all() and st.full_steps == list(range(STEPS)) and st.flops_fraction == 1.0


def test_rfc_keeps_its_budget(text_to_image):
    pipe, ref = text_to_image
    with relcache.cached(pipe, RFC(target_nfc=4)):
        out = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
        st = relcache.stats(pipe)
    assert st.nfc == 4 and st.full_steps[:2] == [0, 1] and st.flops_fraction == pytest.approx(4 / STEPS)
    error = float(np.abs(out - ref).sum() / np.abs(ref).sum())
    with relcache.cached(pipe, FORA(STEPS, 1)):  # full at step 0 only
        reuse = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
    assert np.isfinite(out).all() and 0 < error < float(np.abs(reuse - ref).sum() / np.abs(ref).sum())
