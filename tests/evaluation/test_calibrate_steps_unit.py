"""``calibrate_steps`` on a tiny random DiT (not the shipped model): what it records of RFC's run and of the search,
each measured again here, and its refusal of a model with caching already on."""

import pytest
import torch
from conftest import tiny_dit

import relcache
from relcache import ConfigError, Steps
from relcache.evaluation import steps_search
from relcache.evaluation.reference import sample_digits
from relcache.methods.history import relative_l1
from relcache.methods.predictors import Relational

NUM_STEPS, NFC = 8, 4


def _generate(model):
    labels = torch.tensor([3, 7])
    return lambda: sample_digits(model, labels, num_steps=NUM_STEPS, generator=torch.Generator().manual_seed(5))


def test_rfcs_run_and_the_search_are_recorded_as_measured(monkeypatch):
    model = tiny_dit(num_classes=10)
    generate = _generate(model)
    calls, options = [], {}
    search = steps_search.search_steps

    def logged(error, start, num_steps, **kw):  # every error the search sees, in order
        options.update(kw)
        def logging_error(steps: Steps) -> float:
            calls.append((steps.steps, error(steps)))
            return calls[-1][1]

        return search(logging_error, start, num_steps, **kw)

    monkeypatch.setattr(steps_search, "search_steps", logged)
    found = steps_search.calibrate_steps(model, generate, NFC, NUM_STEPS, Relational(3), radius=1, rounds=2,
                                         progress=False)
    assert options == {"radius": 1, "rounds": 2, "progress": False}
    assert not relcache.is_enabled(model)
    with torch.no_grad():
        ref = generate()
        with relcache.cached(model, relcache.RFC(order=3, target_nfc=NFC)):  # RFC of the predictor's order
            rfc_out = generate()
            rfc_steps = tuple(relcache.stats(model).full_steps)
    assert found.rfc_steps == rfc_steps
    assert found.rfc_error == pytest.approx(relative_l1(rfc_out, ref), rel=1e-6)  # RFC's error against full
    assert calls[0][0] == steps_search.fit_count(rfc_steps, NFC, NUM_STEPS)  # the search starts from RFC's steps
    assert found.start_error == calls[0][1] and found.evaluated == len(calls)
    assert found.error == min(err for _, err in calls) and (found.steps.steps, found.error) in calls


def test_a_model_with_caching_on_is_refused():
    model = tiny_dit(num_classes=10)
    relcache.enable(model, relcache.FORA(2))
    try:
        with pytest.raises(ConfigError, match="disable caching on the model first"):
            steps_search.calibrate_steps(model, _generate(model), NFC, NUM_STEPS, Relational(2), progress=False)
    finally:
        relcache.disable(model)
