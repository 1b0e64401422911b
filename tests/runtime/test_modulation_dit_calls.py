"""Batch modulation on DiT called with positional arguments, ``model(x, t, labels)`` (found by a mutation review:
the adapter reads the timestep and the class labels by position too)."""

from __future__ import annotations

import torch
from conftest import tiny_dit
from test_modulation import LABELS, LAYERS, PROJECTIONS, STEPS, TS, _served

import relcache
from relcache import FORA


def _positional_loop(model):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    relcache.begin_generation(model, timesteps=TS)
    outs = []
    with torch.no_grad():
        for t in TS:
            out = model(x, torch.full((2,), int(t)), LABELS).sample  # hidden_states, timestep, class_labels
            outs.append(out)
            x = x - 0.05 * out
    return outs


def test_a_positional_call_is_served_from_the_table():
    model = tiny_dit(layers=LAYERS)
    with relcache.cached(model, FORA(1, 1)):
        plain = _positional_loop(model)
    with relcache.cached(model, FORA(1, 1), batch_modulation=True):
        got = _positional_loop(model)
        assert _served(model) == (STEPS - 1) * PROJECTIONS
    for a, b in zip(plain, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_dit_without_blocks_has_no_modulation():
    from torch import nn

    from relcache.models.dit import DiTAdapter

    model = nn.Module()
    model.transformer_blocks = nn.ModuleList()
    model.proj_out_1 = nn.Linear(2, 2)
    assert DiTAdapter().modulation(model) is None
