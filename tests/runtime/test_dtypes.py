"""Models in float64 (and half precision): relcache computes its norms in a dtype the model's tensors fit."""

import pytest
import torch
from conftest import run_loop, tiny_dit

import relcache
from relcache import FORA, RFC, CacheConfig, InputError, Taylor
from relcache.methods.history import sample_norm

STEPS = 12


def _double_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([1, 7])


@pytest.fixture(scope="module")
def double_dit():
    return tiny_dit().double()


@pytest.mark.parametrize("dtype,norm_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
])
def test_sample_norm_is_float32_or_float64(dtype, norm_dtype):
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4).to(dtype)
    for p in (1, 2):
        norm = sample_norm(x, p)
        assert norm.dtype == norm_dtype and norm.shape == (2,)
        torch.testing.assert_close(norm.double(), torch.linalg.vector_norm(x.double().flatten(1), ord=p, dim=1),
                                   rtol=1e-2, atol=0)


def test_float64_norms_keep_float64_precision():
    """1 + 1e-12 is 1 in float32: a float64 norm must see the difference."""
    x = torch.tensor([[1.0 + 1e-12]], dtype=torch.float64)
    assert sample_norm(x, 1).item() - 1.0 == pytest.approx(1e-12, rel=1e-3)


RCS_CONFIGS = [RFC(threshold=0.5), RFC(target_nfc=5), CacheConfig(Taylor(2), InputError(threshold=0.5))]


@pytest.mark.parametrize("config", RCS_CONFIGS, ids=lambda c: c.label)
def test_float64_model_runs_input_error_schedules(double_dit, config):
    """Used to fail inside relcache: ``linalg.vector_norm: the dtype of the input (Double) should be convertible without
    narrowing to the specified dtype (Float)``."""
    x, y = _double_inputs()
    ref = run_loop(double_dit, x, y, steps=STEPS)
    with relcache.cached(double_dit, config):
        out = run_loop(double_dit, x, y, steps=STEPS)
        st = relcache.stats(double_dit)
    assert all(o.dtype == torch.float64 and torch.isfinite(o).all() for o in out)
    assert 2 < st.nfc < STEPS and st.full_steps[:2] == [0, 1]
    if config.schedule.target_nfc is not None:
        assert st.nfc == 5
    # cached, so not exact, but a forecast of the same model: close to full computation
    rel = ((out[-1] - ref[-1]).abs().sum() / ref[-1].abs().sum()).item()
    assert 0 < rel < 0.5


@pytest.mark.parametrize("config", [FORA(1, 1), RFC(threshold=0.0), RFC(target_nfc=STEPS)], ids=lambda c: c.label)
def test_float64_every_step_full_equals_uncached(double_dit, config):
    x, y = _double_inputs()
    ref = run_loop(double_dit, x, y, steps=STEPS)
    with relcache.cached(double_dit, config):
        out = run_loop(double_dit, x, y, steps=STEPS)
        assert relcache.stats(double_dit).nfc == STEPS
    assert all(torch.equal(a, b) and a.dtype == torch.float64 for a, b in zip(out, ref, strict=True))


def test_bfloat16_model_runs_rfc():
    model = tiny_dit().to(torch.bfloat16)
    x, y = _double_inputs()
    with relcache.cached(model, RFC(target_nfc=5)):
        out = run_loop(model, x.bfloat16(), y, steps=STEPS)
        assert relcache.stats(model).nfc == 5
    assert out[-1].dtype == torch.bfloat16 and torch.isfinite(out[-1]).all()
