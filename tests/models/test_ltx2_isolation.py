"""LTX-2's modality-isolation guidance: an extra transformer call per step, in its own cache context
("uncond_modality", ``isolate_modalities=True``), that skips the two cross-modal attentions the adapter lists. The
context keeps its own caches and budget, and computing every step fully stays exact (tiny model: families.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from families import ltx2_pipe  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def isolating() -> tuple[Any, np.ndarray]:
    """The tiny LTX-2 whose second call per step isolates the modalities, and its uncached output."""
    pipe = ltx2_pipe()
    inputs = pipe.inputs
    pipe.inputs = lambda x, t, ctx: {**inputs(x, t, ctx), "isolate_modalities": ctx == "uncond_modality"}
    pipe.contexts = ("cond", "uncond_modality")
    return pipe, pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images


def test_isolated_call_skips_the_cross_modal_attentions(isolating):
    pipe, _ = isolating
    calls: list[str] = []
    block = pipe.transformer.transformer_blocks[0]
    handles = [block.audio_to_video_attn.register_forward_pre_hook(lambda *_: calls.append("a2v")),
               pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: calls.append(
                   "isolated" if kw.get("isolate_modalities") else "call"), with_kwargs=True)]
    try:
        pipe(num_inference_steps=1, generator=torch.manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    assert calls == ["call", "a2v", "isolated"]


def test_every_step_full_is_exact_with_the_isolated_context(isolating):
    pipe, ref = isolating
    with relcache.cached(pipe, FORA(1, 1)):
        out = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
        st = relcache.stats(pipe)
    assert (out == ref).all()
    assert {c: x.full_steps for c, x in st.contexts.items()} == {c: list(range(STEPS)) for c in pipe.contexts}


def test_rfc_budget_holds_in_each_context(isolating):
    pipe, ref = isolating
    with relcache.cached(pipe, RFC(target_nfc=4)):
        out = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
        st = relcache.stats(pipe)
    assert tuple(st.contexts) == pipe.contexts and all(c.nfc == 4 for c in st.contexts.values())
    assert np.isfinite(out).all() and not (out == ref).all()
    error = float(np.abs(out - ref).sum() / np.abs(ref).sum())
    with relcache.cached(pipe, FORA(STEPS, 1)):  # full at step 0 only
        reuse = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
    assert error < float(np.abs(reuse - ref).sum() / np.abs(ref).sum())
