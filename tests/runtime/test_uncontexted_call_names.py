"""Rules of ``UncontextedCalls.name`` not covered elsewhere: a call without latents ends the step, a timestep that
is no tensor nor number repeats by identity, and a static-buffer loop's timestep is compared by the values it had."""

from __future__ import annotations

import torch

from relcache.runtime.uncontexted import UncontextedCalls


def test_a_call_without_latents_ends_the_step():
    calls = UncontextedCalls()
    x, t = torch.zeros(2, 3), torch.ones(2)
    assert calls.name(x, t) == "default"
    assert calls.name(None, t) == "default"
    assert calls.name(x, t) == "default"  # not the second call of the first step
    assert calls.name(x, t) == "default.2"


def test_the_same_timestep_object_repeats_whatever_it_is():
    calls = UncontextedCalls()
    x, marker = torch.zeros(2, 3), object()
    assert calls.name(x, None) == "default"
    assert calls.name(x, None) == "default.2"
    assert calls.name(x, marker) == "default"  # another object
    assert calls.name(x, marker) == "default.2"
    assert calls.name(x, object()) == "default"  # an object that is no tensor nor number: not equal by value


def test_a_static_buffer_timestep_refilled_with_other_values_is_the_next_step():
    """Under inference_mode the latents stay unchanged while the timestep buffer gets new values: a new step (the
    values kept are a copy, not the buffer itself)."""
    calls = UncontextedCalls()
    with torch.inference_mode():
        y, s = torch.zeros(2, 3), torch.ones(2)
        assert calls.name(y, s) == "default"
        assert calls.name(y, s) == "default.2"
        s.fill_(0.5)
        assert calls.name(y, s) == "default"
        assert calls.name(y, s) == "default.2"
        s.fill_(0.25)
        assert calls.name(y, s) == "default"


def test_equal_number_timesteps_in_other_objects_repeat():
    """A float or int timestep computed anew for each call (another object, equal value): the same step."""
    calls = UncontextedCalls()
    x = torch.zeros(2, 3)
    assert calls.name(x, float("0.5")) == "default"
    assert calls.name(x, float("0.5")) == "default.2"
    assert calls.name(x, int("1000")) == "default"
    assert calls.name(x, int("1000")) == "default.2"
    assert calls.name(x, float("0.25")) == "default"
