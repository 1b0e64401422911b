"""Fault injection: an exception or a KeyboardInterrupt at each phase of a generation (its first transformer call,
mid-generation, inside a cached module, in the VAE decode, in a step callback) leaves relcache ready, and the next
generation is bit-identical to the first one after a fresh ``enable`` (outputs and stats). Also on a transformer
shared by two pipelines. Tiny SD3 (CFG batched, so CFG-Cache holds state too) and DiT pipelines, few steps."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import dit_pipe  # noqa: E402
from diffusers import DDIMScheduler, DiTPipeline  # noqa: E402
from families import sd3_kwargs, sd3_pipe  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC, CFGCache  # noqa: E402

STEPS = 8
#: RCS with a budget and CFG-Cache: schedule memory, module caches and CFG deltas are all live when a fault hits
CONFIG = dataclasses.replace(RFC(target_nfc=4), cfg_cache=CFGCache(interval=2, window_steps=(2, STEPS), skip_full=True))
FAULTS = [RuntimeError, KeyboardInterrupt]




def _result(pipe: Any, **kw: Any) -> tuple[np.ndarray, tuple]:
    """One SD3 call (decoded by the VAE) and what its stats say."""
    image = pipe(num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0),
                 **sd3_kwargs(), **kw).images
    st = relcache.stats(pipe)
    return image, (st.num_steps, st.full_steps, st.uncond_skipped, st.flops_fraction, st.model_flops_fraction)


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, tuple]:
    """The first generation after a fresh enable."""
    pipe = sd3_pipe()
    with relcache.cached(pipe, CONFIG):
        return _result(pipe)


def _raise_at(n: int, fault: type[BaseException]) -> Callable[..., None]:
    """A forward pre-hook that raises ``fault`` at its ``n``-th call (0-based)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        if calls[0] - 1 == n:
            raise fault("injected")
    return hook


@contextmanager
def _fault(pipe: Any, phase: str, fault: type[BaseException]) -> Iterator[dict[str, Any]]:
    """Arm the fault of ``phase``; yields extra call arguments; disarms on exit."""
    model = pipe.transformer
    kwargs: dict[str, Any] = {}
    handle = None
    if phase == "first call":  # inside the transformer's forward, before any cached module of step 0
        handle = model.pos_embed.register_forward_pre_hook(_raise_at(0, fault))
    elif phase == "mid-generation":  # after every module of step 3 ran or was forecast, before the step returns
        handle = model.norm_out.register_forward_pre_hook(_raise_at(3, fault))
    elif phase == "module hook":  # inside a cached module computing at its third full step
        handle = model.transformer_blocks[1].attn.to_q.register_forward_pre_hook(_raise_at(2, fault))
    elif phase == "vae decode":  # every step ran; the pipeline's end is never reached
        def decode(*_: Any, **__: Any) -> None:
            raise fault("injected")
        pipe.vae.decode = decode
    elif phase == "step callback":
        def callback(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            if i == 4:
                raise fault("injected")
            return {}
        kwargs["callback_on_step_end"] = callback
    try:
        yield kwargs
    finally:
        if handle is not None:
            handle.remove()
        vars(pipe.vae).pop("decode", None)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("phase", ["first call", "mid-generation", "module hook", "vae decode", "step callback"])
def test_the_generation_after_a_fault_equals_a_fresh_one(fresh, phase, fault):
    pipe = sd3_pipe()
    with relcache.cached(pipe, CONFIG):
        session = vars(pipe.transformer)["_relcache"]
        with _fault(pipe, phase, fault) as kwargs, pytest.raises(fault, match="injected"):
            _result(pipe, **kwargs)
        assert session.current is None  # the transformer call that raised ended
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a cut-short generation says so at the next start
            image, stats = _result(pipe)
        assert session.current is None and not any(s.computing for s in session.slots)
        np.testing.assert_array_equal(image, fresh[0])
        assert stats == fresh[1]


def _dit_call(pipe: DiTPipeline) -> tuple[np.ndarray, list[int]]:
    out = pipe([1, 2], num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0))
    return out.images, relcache.stats(pipe).full_steps


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_a_fault_in_one_pipeline_of_a_shared_transformer(fault):
    """B (A's transformer, its own scheduler) stops mid-generation; A's next call and B's next call each equal the
    first call after a fresh enable."""
    ref_pipe = dit_pipe()
    with relcache.cached(ref_pipe, FORA(3)):
        ref = _dit_call(ref_pipe)
    a = dit_pipe()
    b = DiTPipeline(transformer=a.transformer, vae=a.vae, scheduler=DDIMScheduler.from_config(a.scheduler.config))
    b.set_progress_bar_config(disable=True)
    with relcache.cached(a, FORA(3)), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _dit_call(a)
        handle = a.transformer.pos_embed.register_forward_pre_hook(_raise_at(4, fault))
        with pytest.raises(fault, match="injected"):
            _dit_call(b)
        handle.remove()
        for pipe in (a, b, b, a):
            image, full = _dit_call(pipe)
            np.testing.assert_array_equal(image, ref[0])
            assert full == ref[1]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_a_hand_written_loop_cut_short(dit, fault):
    """A bare loop stopped at step 3 by a fault inside the transformer; the next loop (begin_generation) equals the
    first loop after a fresh enable."""
    from conftest import run_loop

    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7])
    with relcache.cached(dit, CONFIG):
        ref = run_loop(dit, torch.cat([x[:1], x[:1]]), y, steps=STEPS)
        ref_stats = relcache.stats(dit).full_steps, relcache.stats(dit).uncond_skipped
    with relcache.cached(dit, CONFIG), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        handle = dit.pos_embed.register_forward_pre_hook(_raise_at(3, fault))
        with pytest.raises(fault, match="injected"):
            run_loop(dit, torch.cat([x[:1], x[:1]]), y, steps=STEPS)
        handle.remove()
        outs = run_loop(dit, torch.cat([x[:1], x[:1]]), y, steps=STEPS)
        assert (relcache.stats(dit).full_steps, relcache.stats(dit).uncond_skipped) == ref_stats
    assert all(torch.equal(a, b) for a, b in zip(outs, ref, strict=True))
