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
