"""One enabled transformer used from several threads: generations one at a time, each in any thread or with its
steps in different threads, are served; a call or a generation's start while another thread is inside a call is
refused with ``ConcurrentUseError`` before it touches any state, so the running generation stays exact (found by a
careful-user review: two threads at once gave wrong or NaN images, or errors naming other causes)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import run_loop, tiny_dit

import relcache
from relcache import ConcurrentUseError, TaylorSeer

STEPS = 6


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 7])


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn()`` in a new thread; its result or exception lands in the returned dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.fixture
def model() -> Iterator[torch.nn.Module]:
    m = tiny_dit(layers=2)
    relcache.enable(m, TaylorSeer(2))
    yield m
    relcache.disable(m)


def test_generations_one_at_a_time_in_different_threads_are_served(model):
    x, y = _inputs()
    ref = run_loop(model, x, y, steps=STEPS)
    full = relcache.stats(model).full_steps
    for _ in range(2):  # a thread pool: each generation in a thread of its own
        thread, out = _in_thread(lambda: run_loop(model, x, y, steps=STEPS))
        thread.join()
        assert "error" not in out and _equal(out["result"], ref)
        assert relcache.stats(model).full_steps == full == [0, 1, 3, 5]


def test_a_second_thread_is_refused_while_a_call_runs_and_that_generation_stays_exact(model):
    """Mutants: no refusal in ``admit`` (the second call's start reset the running call's step), no refusal in
    ``begin`` (it reset the running generation), a refused call releasing the running one's admission (the next
    intruder was let in)."""
    x, y = _inputs()
    ref = run_loop(model, x, y, steps=STEPS)
    full = relcache.stats(model).full_steps
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def pause(*_: Any) -> None:  # inside step 2's call (a cached step), once
        if not inside.is_set() and len(calls) == 3:
            inside.set()
            release.wait(60)

    handles = [model.register_forward_pre_hook(lambda *_: calls.append(1)),
               model.pos_embed.register_forward_pre_hook(pause)]
    try:
        thread, out = _in_thread(lambda: run_loop(model, x, y, steps=STEPS))
        assert inside.wait(60)
        for _ in range(2):
            with pytest.raises(ConcurrentUseError, match="is running a call in another thread"):
                with torch.no_grad():
                    model(x, timestep=torch.full((2,), 999), class_labels=y)
        with pytest.raises(ConcurrentUseError):
            relcache.begin_generation(model, STEPS, guidance=False)
        release.set()
        thread.join()
    finally:
        release.set()
        for h in handles:
            h.remove()
    assert "error" not in out and _equal(out["result"], ref)
    assert relcache.stats(model).full_steps == full


def test_a_generation_whose_steps_run_in_different_threads_is_served(model):
    """A loop announced in one thread whose every step runs in a new thread (a streaming generator under a thread
    pool): steps taken in turn are one generation, equal to the same loop in one thread."""
    x, y = _inputs()
    ref = run_loop(model, x, y, steps=STEPS)
    full = relcache.stats(model).full_steps

    relcache.begin_generation(model, STEPS)
    outs, latents = [], x
    for i in range(STEPS):
        t = torch.full((2,), 999 - i * (999 // STEPS))

        def step(latents: torch.Tensor = latents, t: torch.Tensor = t) -> torch.Tensor:
            with torch.no_grad():
                return model(latents, timestep=t, class_labels=y).sample

        thread, out = _in_thread(step)
        thread.join()
        outs.append(out["result"])
        latents = latents - 0.05 * out["result"] + 0.01 * i
    assert _equal(outs, ref) and relcache.stats(model).full_steps == full


def test_a_pipeline_call_paused_between_steps_refuses_another_threads_generation():
    """Two pipelines share one enabled transformer. While pipeline A's call is between two steps (its scheduler's
    step, a callback streaming a preview), pipeline B's call in another thread is refused at its start, and A's image
    is that of A alone (found by a careful-user review: B restarted A's generation and freed its caches, and A's
    image came out wrong without a word). Once A's call has left the pipeline (here: raised from its scheduler's
    step, so its end never came), B is served. Mutants: no refusal between a pipeline call's steps; a refusal that
    does not look whether the owning thread is still inside its pipeline call."""
    import numpy as np
    from conftest import dit_pipe
    from diffusers import DDIMScheduler, DiTPipeline

    pipe_a = dit_pipe()
    pipe_b = DiTPipeline(transformer=pipe_a.transformer, vae=pipe_a.vae,
                         scheduler=DDIMScheduler.from_config(pipe_a.scheduler.config))
    pipe_b.set_progress_bar_config(disable=True)
    relcache.enable(pipe_a, relcache.RFC(target_nfc=4))

    def call(pipe: Any, label: int) -> np.ndarray:
        return pipe(class_labels=[label], num_inference_steps=10, generator=torch.Generator().manual_seed(label),
                    output_type="np").images

    step, steps, at_5 = pipe_a.scheduler.step, [0], [None]

    def step_then(*args: Any, **kwargs: Any) -> Any:  # A's scheduler step, then what the test does after step 5
        got = step(*args, **kwargs)
        steps[0] += 1
        if steps[0] == 5 and at_5[0] is not None:
            at_5[0]()
        return got

    pipe_a.scheduler.step = step_then
    try:
        ref_a, ref_b = call(pipe_a, 1), call(pipe_b, 2)
        paused, resume = threading.Event(), threading.Event()

        def pause() -> None:
            paused.set()
            resume.wait(60)

        steps[0], at_5[0] = 0, pause
        thread, out = _in_thread(lambda: call(pipe_a, 1))
        try:
            assert paused.wait(60)
            with pytest.raises(ConcurrentUseError, match="in the middle of a pipeline call's generation"):
                call(pipe_b, 2)
        finally:
            resume.set()
            thread.join()
        assert "error" not in out and np.array_equal(out["result"], ref_a)

        def interrupt() -> None:
            raise KeyboardInterrupt

        steps[0], at_5[0] = 0, interrupt
        thread, out = _in_thread(lambda: call(pipe_a, 1))
        thread.join()
        assert isinstance(out.get("error"), KeyboardInterrupt)
        assert np.array_equal(call(pipe_b, 2), ref_b)
    finally:
        relcache.disable(pipe_a)
