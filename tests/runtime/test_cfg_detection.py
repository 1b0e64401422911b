"""CFG-Cache is inert without guidance (issue 16, item 3): a CFG batch is what the caller says it is (the pipeline's
guidance scale or ``do_classifier_free_guidance``, ``begin_generation(..., guidance=False)`` in a hand-written
loop), not any batch whose two halves happen to be equal."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import dit_pipe, run_loop

import relcache
from relcache import FORA, CFGCache, FasterCache
from relcache.models.dit import DiTAdapter

STEPS = 20


@pytest.fixture(autouse=True)
def _every_embedding_copy_computed(monkeypatch):
    """No shared embedding copies (a detail of DiT unrelated to CFG)."""
    monkeypatch.setattr(DiTAdapter, "shared_modules", lambda self, model: [])


def _same_seed_pair(pipe, guidance_scale: float) -> torch.Tensor:
    """Two samples of two classes from two generators of one seed: equal latents in the two halves of the batch."""
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    return torch.as_tensor(pipe([1, 7], guidance_scale=guidance_scale, num_inference_steps=STEPS, generator=gens,
                                output_type="np").images)


def test_equal_seeds_without_guidance_are_not_rebuilt_from_each_other():
    """At guidance_scale=1 sample 1 used to be rebuilt from sample 0 at 9 of 20 steps (max diff 0.23)."""
    pipe = dit_pipe()
    config = FasterCache()
    with relcache.cached(pipe, config):
        got = _same_seed_pair(pipe, 1.0)
        assert relcache.stats(pipe).uncond_skipped == 0
    with relcache.cached(pipe, dataclasses.replace(config, cfg_cache=None)):  # the config without CFG-Cache
        ref = _same_seed_pair(pipe, 1.0)
    assert torch.equal(got, ref)


def test_guidance_on_is_still_a_cfg_batch():
    """With guidance the same call is CFG batched as before: the unconditional half is skipped where scheduled."""
    pipe = dit_pipe()
    with relcache.cached(pipe, FasterCache()):
        _same_seed_pair(pipe, 4.0)
        assert relcache.stats(pipe).uncond_skipped > 0


def test_a_hand_written_loop_says_it_runs_no_guidance():
    """A bare transformer has no pipeline to ask: equal halves count as a CFG batch unless begin_generation says
    guidance=False, which leaves CFG-Cache inert (exactly the config without it)."""
    from conftest import tiny_dit

    dit = tiny_dit()
    half = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x, y = torch.cat([half, half]), torch.tensor([1, 7])
    config = dataclasses.replace(FORA(1, 1), cfg_cache=CFGCache(interval=3, window_steps=(2, 12)))

    def loop(cfg: relcache.CacheConfig, **begin) -> tuple[list[torch.Tensor], int]:
        with relcache.cached(dit, cfg):
            relcache.begin_generation(dit, 12, **begin)
            outs = run_loop(dit, x, y, begin=False)
            return outs, relcache.stats(dit).uncond_skipped

    class Sampler:  # a user's own wrapper holding the model as ``transformer``: no pipeline, and it says nothing
        def __init__(self) -> None:
            self.transformer = dit

        def sample(self, cfg: relcache.CacheConfig, **begin) -> tuple[list[torch.Tensor], int]:
            return loop(cfg, **begin)

    plain, _ = loop(FORA(1, 1))
    off, skipped_off = loop(config, guidance=False)
    _, skipped_default = loop(config)
    assert skipped_off == 0 and skipped_default > 0
    assert all(torch.equal(a, b) for a, b in zip(off, plain, strict=True))
    # called from the wrapper's method, its "nothing said" overrode guidance=False: 6 skips (found by review)
    wrapped, skipped_wrapped = Sampler().sample(config, guidance=False)
    assert skipped_wrapped == 0 and all(torch.equal(a, b) for a, b in zip(wrapped, plain, strict=True))
    with pytest.raises(relcache.ConfigError, match="guidance must be True, False or None"):
        relcache.begin_generation(dit, 12, guidance="yes")


def test_what_a_pipeline_says():
    """The rule, case by case: a call's ``do_classifier_free_guidance`` local, then ``do_true_cfg`` (CFG as split
    calls: a batched call is no CFG pair), then the pipeline's property, then ``guidance_scale > 1``."""
    from relcache.runtime.callers import says_cfg

    class Plain:
        pass

    class WithProperty:
        _guidance_scale = 1.0

        @property
        def do_classifier_free_guidance(self) -> bool:
            return self._guidance_scale > 1

    class Unset:
        @property
        def do_classifier_free_guidance(self) -> bool:
            return self._guidance_scale > 1  # before the call sets it

    assert says_cfg(Plain(), {"do_classifier_free_guidance": False, "guidance_scale": 7.0}) is False
    assert says_cfg(Plain(), {"do_true_cfg": True, "guidance_scale": 3.5}) is False  # FLUX: embedded guidance
    assert says_cfg(WithProperty(), {"guidance_scale": 7.0}) is False
    assert says_cfg(Unset(), {"guidance_scale": 7.0}) is True
    assert says_cfg(Plain(), {"guidance_scale": 1}) is False and says_cfg(Plain(), {"guidance_scale": 1.5}) is True
    assert says_cfg(Plain(), {"guidance_scale": True}) is None and says_cfg(Plain(), {}) is None
