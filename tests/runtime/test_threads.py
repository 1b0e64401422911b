"""One enabled transformer used from several threads: one generation at a time, in any thread (a thread pool), is
served; a second thread inside another's generation is refused with ``ConcurrentUseError`` before it touches any
state, so the running generation stays exact (found by a careful-user review: wrong or NaN images, or errors naming
other causes)."""

from __future__ import annotations

import contextlib
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
    """Mutants: no ``enter_call`` refusal (the second call's start reset the running call's step), no refusal in
    ``begin`` (it reset the running generation), ``leave_call`` clearing another thread's mark (the refused call's
    end ended the running call's step)."""
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
        with pytest.raises(ConcurrentUseError, match="from two threads in one generation"):
            with torch.no_grad():
                model(x, timestep=torch.full((2,), 999), class_labels=y)
        with pytest.raises(ConcurrentUseError):
            relcache.begin_generation(model, STEPS)
        release.set()
        thread.join()
    finally:
        release.set()
        for h in handles:
            h.remove()
    assert "error" not in out and _equal(out["result"], ref)
    assert relcache.stats(model).full_steps == full


def test_a_thread_whose_generation_another_thread_replaced_is_refused_at_its_next_call(model):
    """Mutant: no ``check_owner`` (the first thread went on in the other's generation, unnoticed)."""
    x, y = _inputs()
    ref = run_loop(model, x, y, steps=STEPS)
    paused, release = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def around(i: int) -> Iterator[None]:
        if i == 3:  # between its calls: before step 3's
            paused.set()
            release.wait(60)
        yield

    thread, out = _in_thread(lambda: run_loop(model, x, y, steps=STEPS, around=around))
    try:
        assert paused.wait(60)
        with pytest.warns(RuntimeWarning, match="announced 6 steps .* but ran 3"):  # the one it replaced
            assert _equal(run_loop(model, x, y, steps=STEPS), ref)  # this thread starts a generation of its own
    finally:
        release.set()
        thread.join()
    assert isinstance(out.get("error"), ConcurrentUseError)
