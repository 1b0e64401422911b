"""RFE's fused eager forecast (``relcache.methods.fused``), run by Triton's CPU interpreter: the torch path's numbers,
its fallbacks, and two kernel launches per cached module where the torch path makes eight.

The interpreter converts float32 to bfloat16 by truncation where a GPU rounds to nearest, so bfloat16 results are
checked to within two units in the last place; float16 and float32 are checked tightly.
"""

import warnings

import pytest
import torch
from conftest import tiny_dit
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

pytest.importorskip("triton")

import relcache  # noqa: E402
from relcache.methods import fused  # noqa: E402
from relcache.methods.config import CacheConfig  # noqa: E402
from relcache.methods.history import numbers_on, step_row  # noqa: E402
from relcache.methods.predictors import Relational, Reuse  # noqa: E402
from relcache.methods.schedules import Interval  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """The kernels (built for Triton's CPU interpreter: conftest.py), the fused forecast on, its failure flag clear."""
    if not fused._interpreting():
        pytest.skip("needs Triton's CPU interpreter: TRITON_INTERPRET=1 before triton is imported (conftest.py)")
    from relcache.methods import fused_kernels
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_broken", False)
    return fused_kernels


class _Launches:
    """Counts the launches of the two kernels, by wrapping them in ``fused_kernels``. A launch runs outside any
    dispatch mode: the interpreter's own tensor work on the host is not a kernel of the forecast."""

    def __init__(self, monkeypatch, kernels) -> None:
        self.n = 0
        for name in ("_stats", "_finish"):
            kernel = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, self._wrap(kernel))

    def _wrap(self, kernel):
        counter = self

        class Counted:
            def __getitem__(self, grid):
                counter.n += 1
                launch = kernel[grid]

                def run(*args, **kwargs):
                    with _disable_current_modes():
                        return launch(*args, **kwargs)

                return run

        return Counted()


def _state(order: int, dtype: torch.dtype, shape=(2, 40, 64), same_inputs: bool = False, flat: bool = False):
    """An RFE state after ``order + 2`` records 3 steps apart, and the next input (2560 numbers per sample: three
    chunks, the last one partial)."""
    predictor = Relational(order)
    state = predictor.new_state(None)
    gen = torch.Generator().manual_seed(order)
    fixed = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        for i in range(order + 2):
            inp = fixed if same_inputs else torch.randn(*shape, generator=gen)
            out = fixed if flat else torch.randn(*shape, generator=gen)
            predictor.record(state, inp.to(dtype), out.to(dtype), None if i == 0 else torch.tensor(3.0))
    return predictor, state, torch.randn(*shape, generator=gen).to(dtype)


def _both(predictor, state, inp, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused, torch path) forecasts ``k`` steps after the latest record, from the same state."""
    row = numbers_on([step_row(k)], torch.device("cpu"))[0]
    with torch.no_grad():
        got = predictor.forecast(state, inp, row, k=float(k))
        fused.set_enabled(False)
        try:
            want = predictor.forecast(state, inp, row, k=float(k))
        finally:
            fused.set_enabled(True)
    return got, want


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_forecast_equals_the_torch_path(order, dtype, interpreted, monkeypatch):
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(order, dtype)
    got, want = _both(predictor, state, inp)
    assert launches.n == 2 and got.dtype == want.dtype == dtype
    ulp = torch.finfo(dtype).eps * want.float().abs().amax().item()
    # the norms' summation order only (float32, float16); the interpreter's truncating bfloat16 conversion
    tol = {torch.float32: 8 * ulp, torch.float16: 2 * ulp, torch.bfloat16: 4 * ulp}[dtype]
    assert (got.float() - want.float()).abs().max().item() <= tol
    assert not torch.equal(want, state.out.base(dtype))  # a real forecast, not the reuse it falls back to


def test_fused_forecast_over_chunks_of_several_blocks(interpreted, monkeypatch):
    # at most 2 chunks per sample: each program loops over two blocks of 1024, the second one partial
    monkeypatch.setattr(fused, "MAX_CHUNKS", 2)
    predictor, state, inp = _state(2, torch.float32)
    got, want = _both(predictor, state, inp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["input unchanged", "ratio infinite", "direction zero"])
def test_fused_fallbacks_equal_the_torch_path(case, interpreted, monkeypatch):
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float32, same_inputs=case == "ratio infinite",
                                   flat=case == "direction zero")
    if case == "input unchanged":
        inp = state.input(torch.float32).clone()
    got, want = _both(predictor, state, inp, k=3)
    assert launches.n == 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    base = state.out.base(torch.float32)
    if case == "input unchanged":  # no change: coefficient 0, the forecast is D_0
        torch.testing.assert_close(got, base, rtol=0, atol=0)
    elif case == "ratio infinite":  # ‖I(a) - I(b)‖ = 0: Taylor's forecast D_0 + k u
        assert torch.isinf(state.ratio).all()
        assert torch.isfinite(got).all() and not torch.equal(got, base)
    else:  # u = 0: 0/0, Taylor's k times a zero direction
        torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_fused_forecast_stays_off_where_it_does_not_apply(interpreted, monkeypatch):
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float32)
    row = numbers_on([step_row(2)], torch.device("cpu"))[0]
    with torch.enable_grad():  # autograd records the forecast: the torch path
        predictor.forecast(state, inp, row, k=2.0)
    with torch.no_grad():
        predictor.forecast(state, inp, row)  # no k on the host (compiled or captured callers): the torch path
        predictor.forecast(state, inp.double(), row, k=2.0)  # float64: the torch path
        fused.set_enabled(False)
        predictor.forecast(state, inp, row, k=2.0)
    assert launches.n == 0


def test_a_failing_kernel_warns_once_and_the_torch_path_takes_over(interpreted, monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no kernel today")

    monkeypatch.setattr(interpreted, "_stats", Broken())
    predictor, state, inp = _state(2, torch.float32)
    with pytest.warns(RuntimeWarning, match="fused RFE forecast failed.*no kernel today"):
        got, want = _both(predictor, state, inp)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _both(predictor, state, inp)  # said once; the torch path from then on
    assert not fused.enabled()


class _Ops(TorchDispatchMode):
    """ATen operators that run a kernel: views and allocations (``empty``) left out."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view and not func.__name__.startswith("empty")
        return func(*args, **(kwargs or {}))


def _generation(config: CacheConfig, steps: int = 7) -> tuple[list[torch.Tensor], int]:
    """A tiny DiT's outputs over ``steps`` steps (4 full, then cached), and the kernels of its last step."""
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    relcache.enable(model, config)
    relcache.begin_generation(model, num_steps=steps)
    outs, ops = [], _Ops()
    try:
        with torch.no_grad():
            for i in range(steps):
                t = torch.full((2,), 999 - 20 * i)
                with ops if i == steps - 1 else torch.no_grad():
                    outs.append(model(x + 0.01 * i, timestep=t, class_labels=labels).sample)
        assert relcache.stats(model).full_steps == [0, 1, 2, 3]
    finally:
        relcache.disable(model)
    return outs, ops.n


def test_an_rfe_cached_step_launches_foras_kernels_plus_two_per_module(interpreted, monkeypatch):
    launches = _Launches(monkeypatch, interpreted)
    before = fused.launches
    _, fora = _generation(CacheConfig(Reuse(), Interval(1000, 4)))
    outs, rfe = _generation(CacheConfig(Relational(2), Interval(1000, 4)))
    modules = 6  # attention and feed-forward of 3 blocks
    assert launches.n == 3 * 2 * modules  # three cached steps, two kernels per module
    assert fused.launches - before == launches.n  # what benchmarks/cached_step.py adds to the ATen kernels
    assert rfe == fora  # every other kernel of the forecast is gone: FORA + 2 per module (the torch path: + 8)
    fused.set_enabled(False)
    want, _ = _generation(CacheConfig(Relational(2), Interval(1000, 4)))
    for got, ref in zip(outs, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[-1], _generation(CacheConfig(Reuse(), Interval(1000, 4)))[0][-1])
