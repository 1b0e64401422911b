"""SANA-WM's refiner records keys and values into its KV cache in calls between denoising steps
(``kv_cache_mode="capture_pre_rope"`` / ``"inject_and_capture_post_rope"``): relcache runs them as the plain model, so
a capture during a cached generation records exactly what it records uncached and counts no step (tiny model:
families.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_sana_wm_refiner")  # diffusers 0.42 and later

from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache  # noqa: E402
from families import randn, sana_wm_refiner_pipe  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA  # noqa: E402

STEPS = 8


def generate_capturing(pipe: Any) -> tuple[list[torch.Tensor], Any]:
    """Run a generation that, after each scheduler step, captures the keys and values of a fixed clean block."""
    model, captured = pipe.transformer, []
    clean = randn(1, 32, 4, seed=9)
    rope = model.build_rotary_emb_for_absolute_positions(1, [0, 1], 4, 4, torch.device("cpu"), 24.0)
    step = pipe.scheduler.step

    def step_and_capture(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        cache = SanaWMRefinerKVCache(len(model.transformer_blocks))
        model(hidden_states=clean, encoder_hidden_states=randn(1, 6, 16), timestep=torch.zeros(1, 32),
              video_rotary_emb=rope, kv_cache=cache, kv_cache_mode="capture_pre_rope", return_dict=False)
        captured.extend(t for i in range(len(cache)) for t in cache.get(i).get_captured_pre_rope())
        return out

    pipe.scheduler.step = step_and_capture
    try:
        images = pipe(num_inference_steps=STEPS, generator=torch.manual_seed(0)).images
    finally:
        del pipe.scheduler.step
    return captured, images


def test_capture_calls_run_as_the_plain_model():
    pipe = sana_wm_refiner_pipe()
    ref_captured, ref = generate_capturing(pipe)
    with relcache.cached(pipe, FORA(3)):
        captured, out = generate_capturing(pipe)
        st = relcache.stats(pipe)
    assert len(captured) == len(ref_captured) == 2 * 2 * STEPS  # (key, value) per layer per step
    assert all(torch.equal(a, b) for a, b in zip(captured, ref_captured, strict=True))
    assert st.num_steps == STEPS and st.full_steps == [0, 1, 4, 7] and not (out == ref).all()
