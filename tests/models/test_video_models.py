"""CFG-Cache on the video transformers that batch classifier-free guidance in one call, unconditional half first
(Latte, CogVideoX; tiny pipelines in families.py): FasterCache's counts, RFC with CFG-Cache, the unconditional half
rebuilt per frame, guidance scale 1. What every family keeps (module order, exactness, RFC's budget, disable) is
test_contract.py's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from families import CASES, Case  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC, CFGCache, FasterCache, Interval  # noqa: E402

STEPS = 10


@pytest.fixture(scope="module", params=["latte", "cogvideox"])
def built(request: pytest.FixtureRequest) -> tuple[Case, Any, torch.Tensor, list[torch.Tensor]]:
    """(case, pipeline, uncached frames, every uncached transformer call's output) for each model, built once."""
    case = CASES[request.param]
    pipe = case.build()
    return case, pipe, *generate(pipe, case)


def generate(pipe: Any, case: Case, guidance: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The frames and every transformer call's output (read by a forward hook)."""
    outs: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_hook(lambda _m, _a, out: outs.append(out[0]))
    kw = case.kwargs() if guidance is None else {**case.kwargs(), "guidance_scale": guidance}
    try:
        frames = pipe(**kw, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="pt").frames
    finally:
        handle.remove()
    return frames, outs


def generate_with_stats(pipe: Any, case: Case, config: relcache.CacheConfig, guidance: float | None = None):
    """Frames, transformer outputs and the stats as they stand after the last transformer call."""
    seen: list[relcache.CacheStats] = []
    with relcache.cached(pipe, config):
        handle = pipe.transformer.register_forward_hook(lambda *_: seen.append(relcache.stats(pipe)))
        try:
            frames, outs = generate(pipe, case, guidance)
        finally:
            handle.remove()
    return frames, outs, seen[-1]


def test_fastercache_counts_and_is_finite(built):
    case, pipe, ref, _ = built
    # the CFG-Cache schedule FasterCache had by default before 2026-12-02, which the counts below follow
    paper = FasterCache(interval=2, warmup=2, cfg_window=(0.36, 1.0), cfg_phase="window", cfg_refresh_full=False)
    frames, _, st = generate_with_stats(pipe, case, paper)
    assert frames.shape == ref.shape and torch.isfinite(frames).all() and not torch.equal(frames, ref)
    assert st.full_steps == [0, 1, 3, 5, 7, 9] == Interval(2, 2).full_steps(STEPS)
    # window ceil(0.36 * 10) = 4..9, uncond at 4 and 9
    assert st.contexts[case.contexts[0]].uncond_skipped_steps == [5, 6, 7, 8]
    assert st.flops_fraction == pytest.approx((6 - 2 / 2) / STEPS)  # full steps 5 and 7 ran half the batch
    assert 0.5 < st.model_flops_fraction < 1


def test_rfc_with_cfg_cache_counts_and_is_finite(built):
    case, pipe, ref, _ = built
    config = dataclasses.replace(RFC(target_nfc=4), cfg_cache=CFGCache(skip_full=True))
    frames, _, st = generate_with_stats(pipe, case, config)
    assert frames.shape == ref.shape and torch.isfinite(frames).all() and not torch.equal(frames, ref)
    assert st.nfc == 4 and st.full_steps[:2] == [0, 1]
    skipped = st.contexts[case.contexts[0]].uncond_skipped_steps  # only full steps no refresh step reaches
    assert skipped == CFGCache(skip_full=True).skipped_steps(STEPS, st.full_steps)


def _low_band_per_frame(x: torch.Tensor) -> torch.Tensor:
    """The low band of every 2-D image in ``x`` (all axes but the last two looped over), with numpy."""
    arr = x.double().numpy()
    h, w = arr.shape[-2:]
    r = min(h, w) // 5
    yy, xx = np.ogrid[:h, :w]
    mask = (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= r * r
    out = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape[:-2]):
        spec = np.fft.fftshift(np.fft.fft2(arr[idx]))
        out[idx] = np.fft.ifft2(np.fft.ifftshift(spec * mask)).real
    return torch.from_numpy(out).to(x.dtype)


@pytest.mark.parametrize("alpha1", [0.0, 0.5])
def test_cfg_cache_rebuilds_the_unconditional_half_per_frame(built, alpha1):
    """At the first skipped step (5) the inputs are still those of the uncached run: the conditional half (second)
    is the model's, the unconditional half (first) is ``cond_5 + d + alpha1 · LF(d)`` with ``d = uncond_4 - cond_4``
    (``w1 = 1 + alpha1`` on the low band of each frame, ``w2 = 1``)."""
    case, pipe, _, ref = built
    cfg = CFGCache(window=(0.4, 1.0), alpha1=alpha1, alpha2=0.0, early=1.0)
    _, outs, st = generate_with_stats(pipe, case, dataclasses.replace(FORA(1, 1), cfg_cache=cfg))
    assert st.uncond_skipped == 4
    for i in range(5):
        torch.testing.assert_close(outs[i], ref[i], rtol=0, atol=0)
    u4, c4 = ref[4].chunk(2)
    u5, c5 = outs[5].chunk(2)
    torch.testing.assert_close(c5, ref[5].chunk(2)[1], rtol=1e-4, atol=1e-5)
    d = u4 - c4
    torch.testing.assert_close(u5, c5 + d + alpha1 * _low_band_per_frame(d), rtol=0, atol=1e-5)


def test_guidance_scale_one_leaves_cfg_cache_inert(built):
    case, pipe, _, _ = built
    plain, _, _ = generate_with_stats(pipe, case, FasterCache(interval=2, warmup=2, cfg=False), guidance=1.0)
    frames, _, st = generate_with_stats(pipe, case, FasterCache(interval=2, warmup=2), guidance=1.0)
    assert torch.equal(frames, plain) and st.uncond_skipped == 0
