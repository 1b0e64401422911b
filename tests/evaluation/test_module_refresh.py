"""``benchmarks/module_refresh.py``'s wrapper of the runtime's per-module decision (an experiment of issue 19, not a
product feature) against the runtime as it is: it replaces ``ModuleCalls._forecast``, so a change of that method's
arguments broke it without a test noticing (found by review, 2026-12-06: the module slots)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import dit_inputs, run_loop, tiny_dit

import relcache
from relcache import RFC

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from module_refresh import Refresh  # noqa: E402


def _run(tau: float | None, wrapped: bool = True) -> tuple[list[torch.Tensor], Refresh]:
    model = tiny_dit()
    relcache.enable(model, RFC(target_nfc=4))
    x, y = dit_inputs()
    refresh = Refresh()
    try:
        if wrapped:
            with refresh:
                refresh.tau = tau
                out = run_loop(model, x, y, steps=8)
        else:
            out = run_loop(model, x, y, steps=8)
    finally:
        relcache.disable(model)
    return out, refresh


def test_without_a_threshold_it_measures_moves_and_changes_nothing():
    plain, _ = _run(None, wrapped=False)
    got, refresh = _run(None)
    assert refresh.refreshes == 0 and len(refresh.moves) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, plain, strict=True))


def test_at_threshold_zero_every_measured_module_is_computed_instead_of_forecast():
    """Every ready module at a cached step whose input moved at all is computed and recorded: as many refreshes as
    moves measured (each is positive here), and the wrapper is back off after the block."""
    _, refresh = _run(0.0)
    assert len(refresh.moves) > 0 and all(m > 0 for m in refresh.moves)
    assert refresh.refreshes == len(refresh.moves)
    from relcache.runtime import modules

    assert modules.ModuleCalls._forecast is refresh._original
