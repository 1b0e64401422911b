"""``benchmarks/forecast_forms.py`` times alternatives to RFE's eager forecast against "the torch path", its copy of
relcache's own ops: the copy must compute what ``Relational.forecast`` computes, else the benchmark times something
else. It is checked here against relcache's forecast from a recorded state, and TaylorSeer's form against
``Taylor``'s."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from relcache.methods.history import numbers_on, step_row
from relcache.methods.predictors import Relational, Taylor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import forecast_forms  # noqa: E402


def _recorded(predictor, shape=(2, 8, 16)):
    """A state after four records 3 steps apart (order 2 complete), and the next input."""
    state = predictor.new_state()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(4):
            gap = None if i == 0 else torch.tensor(3.0)
            predictor.record(state, torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen), gap)
    return state, torch.randn(*shape, generator=gen)


def test_the_benchmarks_torch_path_is_relcaches_rfe_forecast():
    predictor = Relational(2)
    state, inp = _recorded(predictor)
    k = 2
    row = numbers_on([step_row(k)], torch.device("cpu"))[0]
    d0, d1, d2 = (state.out.get(j, torch.float32) for j in range(3))
    with torch.no_grad():
        want = predictor.forecast(state, inp, row, k=float(k))
        got = forecast_forms.torch_path(inp, state.input(torch.float32), d0, d1, d2, row, state.ratio, float(k))
        functional = forecast_forms.functional(inp, state.input(torch.float32), d0, d1, d2, row, state.ratio, float(k))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(functional, want)
    # the forecast is not the Taylor one: the test would not pass for a copy that left the coefficient out
    assert not torch.allclose(want, forecast_forms.taylor(inp, None, d0, d1, d2, row, state.ratio, float(k)))


def test_the_benchmarks_taylorseer_form_is_taylors_forecast():
    predictor = Taylor(2)
    state, inp = _recorded(predictor)
    row = numbers_on([step_row(2)], torch.device("cpu"))[0]
    d0, d1, d2 = (state.out.get(j, torch.float32) for j in range(3))
    with torch.no_grad():
        want = predictor.forecast(state, inp, row)
        got = forecast_forms.taylor(inp, None, d0, d1, d2, row, None, 2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
