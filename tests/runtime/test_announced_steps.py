"""A generation that runs another number of steps than it announced warns once (issue 16, item 5): its schedule
(RFC's budget above all) was planned for the announced count."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import dit_pipe, run_loop

import relcache
from relcache import RFC, TaylorSeer


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7])


def test_a_loop_shorter_than_announced_warns_with_both_numbers(dit):
    """begin_generation(m, 20) and a 10-step loop with RFC(target_nfc=3) realised NFC 2 without a word."""
    x, y = _inputs()
    relcache.enable(dit, RFC(target_nfc=3))
    try:
        relcache.begin_generation(dit, 20)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing during the loop
            run_loop(dit, x, y, steps=10, begin=False)
        assert relcache.stats(dit).nfc == 2
        with pytest.warns(RuntimeWarning, match=r"announced 20 steps .* but ran 10 \(2 of them full\)") as got:
            relcache.begin_generation(dit, 10)  # the next generation ends this one
        assert len(got) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as announced: no warning, at its end (disable) either
            run_loop(dit, x, y, steps=10, begin=False)
            assert relcache.stats(dit).nfc == 3
            relcache.disable(dit)
    finally:
        if relcache.is_enabled(dit):
            relcache.disable(dit)


def test_a_loop_longer_than_announced_warns_once_at_the_first_step_past(dit):
    """The schedule notices at once: the 5th step of a generation announced with 4 warns, the 6th and the end do
    not."""
    x, y = _inputs()
    with relcache.cached(dit, RFC(target_nfc=3)):
        relcache.begin_generation(dit, 4)
        with pytest.warns(RuntimeWarning, match=r"announced 4 steps .* but runs step 5") as got:
            run_loop(dit, x, y, steps=6, begin=False)
        assert len(got) == 1 and relcache.stats(dit).num_steps == 6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            relcache.begin_generation(dit)
            relcache.begin_generation(dit)  # a generation that ran no step: nothing to say


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_calls_as_announced_do_not_warn_and_an_interrupted_one_does(family):
    """A pipeline call runs what its scheduler announced; neither one stopped through ``pipe._interrupt`` nor one cut
    short by an exception in a step callback warns (the latter warned when the next call started, about the aborted
    one: found by review). FLUX's transformer has diffusers' ``CacheMixin``, whose reset ends the generation before
    the pipeline's own end does: it warned there (review)."""
    pytest.importorskip("transformers")
    import families

    pipe = getattr(families, f"{family}_pipe")()
    kwargs = getattr(families, f"{family}_kwargs")

    def stop_at(step: int, interrupt: bool):
        def callback(p, i, t, kw):
            if i == step:
                if interrupt:
                    p._interrupt = True
                else:
                    raise RuntimeError("stop")
            return {}
        return callback

    with relcache.cached(pipe, TaylorSeer(2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe(num_inference_steps=6, output_type="latent", **kwargs())
            pipe(num_inference_steps=6, output_type="latent", callback_on_step_end=stop_at(2, True), **kwargs())
            assert relcache.stats(pipe).num_steps == 3
        with pytest.raises(RuntimeError, match="stop"):
            pipe(num_inference_steps=6, output_type="latent", callback_on_step_end=stop_at(2, False), **kwargs())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe(num_inference_steps=6, output_type="latent", **kwargs())
        assert relcache.stats(pipe).num_steps == 6


def test_dit_pipeline_calls_do_not_warn():
    pipe = dit_pipe()
    with relcache.cached(pipe, RFC(target_nfc=4)), warnings.catch_warnings():
        warnings.simplefilter("error")
        for steps in (8, 6):
            pipe([1, 7], num_inference_steps=steps, output_type="np")
