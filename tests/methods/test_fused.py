"""RFE's fused eager forecast (``relcache.methods.fused``): the torch path's numbers, its fallbacks, where it stays
off, and two kernel launches per cached module where the torch path makes eight. On a CUDA machine the kernels run
compiled on the GPU; elsewhere Triton's CPU interpreter runs them (conftest.py chooses it before triton is imported).

The interpreter converts float32 to bfloat16 by truncation where a GPU rounds to nearest, so there bfloat16 results
are checked to within a few units in the last place; float16 and float32 are checked tightly.
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import release, tiny_dit
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

triton = pytest.importorskip("triton")
#: torch 2.11 pins Triton 3.6, whose interpreter cannot run these kernels under numpy 2
OLD_INTERPRETER = release(triton.__version__) < (3, 7) and release(np.__version__) >= (2, 0)

import relcache  # noqa: E402
from relcache.methods import fused  # noqa: E402
from relcache.methods.config import CacheConfig  # noqa: E402
from relcache.methods.history import numbers_on, step_row  # noqa: E402
from relcache.methods.plus import RelationalPlus  # noqa: E402
from relcache.methods.predictors import Relational, Reuse  # noqa: E402
from relcache.methods.schedules import Interval  # noqa: E402
from relcache.methods.storage import INT8, CacheStorage  # noqa: E402

#: the tests that run no kernel (the torch path, or a kernel that fails before it runs): they run under the old
#: interpreter too
NO_KERNEL = ("test_the_environment_switches_it_on_and_another_device_is_told_once",
             "test_a_failing_kernel_warns_once_and_the_torch_path_takes_over")


@pytest.fixture(autouse=True)
def interpreted(request, monkeypatch):
    """The kernels' module, the fused forecast on, its failure flag clear. Compiled for the GPU where there is one,
    else run by Triton's CPU interpreter (conftest.py)."""
    if not (torch.cuda.is_available() or fused._interpreting()):
        pytest.skip("needs a CUDA GPU, or Triton's CPU interpreter: TRITON_INTERPRET=1 before triton is imported")
    if fused._interpreting() and OLD_INTERPRETER and request.node.originalname not in NO_KERNEL:
        pytest.skip(f"Triton {triton.__version__}'s CPU interpreter fails under numpy 2 (a loop bound given as an "
                    "argument; fixed in 3.7); the kernels build with it (scripts/fused_build.py)")
    from relcache.methods import fused_kernels
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_broken", False)
    return fused_kernels


DEVICE = "cuda" if torch.cuda.is_available() and not fused._interpreting() else "cpu"
ON_GPU = DEVICE == "cuda"


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


def _state(order: int, dtype: torch.dtype, shape=(2, 40, 64), same_inputs: bool = False, flat: bool = False,
           out_dtype: torch.dtype | None = None, out_shape: tuple[int, ...] | None = None, storage=None,
           predictor: Relational | None = None):
    """An RFE state after ``order + 2`` records 3 steps apart, and the next input (2560 numbers per sample). The
    module's outputs may be of another dtype (``out_dtype``, stored as such) or shape (``out_shape``)."""
    predictor = predictor or Relational(order)
    state = predictor.new_state(storage)
    gen = torch.Generator().manual_seed(order)
    fixed = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        for i in range(order + 2):
            inp = fixed if same_inputs else torch.randn(*shape, generator=gen)
            out = torch.zeros(out_shape or shape) if flat else torch.randn(*(out_shape or shape), generator=gen)
            gap = None if i == 0 else torch.tensor(3.0, device=DEVICE)
            predictor.record(state, inp.to(DEVICE, dtype), out.to(DEVICE, out_dtype or dtype), gap)
    return predictor, state, torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _both(predictor, state, inp, k: int = 2, ran: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused, torch path) forecasts ``k`` steps after the latest record, from the same state; ``ran``: the kernels
    must have run without failing (else the "fused" one would be the torch path's too)."""
    row = numbers_on([step_row(k)], torch.device(DEVICE))[0]
    before = fused.launches
    with torch.no_grad():
        got = predictor.forecast(state, inp, row, k=float(k))
        assert not ran or fused.enabled() and fused.launches == before + 2
        was, fused._enabled = fused._enabled, False  # (not set_enabled(True) after: that forgets a failure)
        try:
            want = predictor.forecast(state, inp, row, k=float(k))
        finally:
            fused._enabled = was
    return got, want


def _assert_as_torch(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to the norms' summation order: float32 within a few units in the last place of the largest value;
    float16 (and bfloat16 on a GPU) equal on all but a few elements, by one unit at most (a coefficient whose last
    float32 bit moved can round the other way); bfloat16 under the interpreter within a few units (it truncates)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = torch.finfo(want.dtype).eps * want.float().abs().amax().item()
    diff = (got.float() - want.float()).abs()
    if want.dtype == torch.float32 or want.dtype == torch.bfloat16 and not ON_GPU:
        assert diff.max().item() <= 8 * ulp
    else:
        assert diff.max().item() <= ulp
        assert (got != want).float().mean().item() < 0.01


@pytest.mark.parametrize("k", [2, 4])  # k/3 is not a binary fraction: the rounded multiplier matters from order 3
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_forecast_equals_the_torch_path(order, dtype, k, interpreted, monkeypatch):
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(order, dtype)
    got, want = _both(predictor, state, inp, k)
    assert launches.n == 2
    _assert_as_torch(got, want)
    assert not torch.equal(want, state.out.base(dtype))  # a real forecast, not the reuse it falls back to


def test_fused_forecast_reads_stored_tensors_of_another_dtype_as_the_torch_path(interpreted, monkeypatch):
    # a float16 input whose module returns float32: D_j stored as float32, read in float16 as storage.load reads them
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(3, torch.float16, out_dtype=torch.float32)
    assert state.out.diffs[1].dtype == torch.float32
    got, want = _both(predictor, state, inp, k=4)
    assert launches.n == 2
    _assert_as_torch(got, want)


@pytest.mark.parametrize("out_shape", [(2, 40, 256), (2, 40, 16)], ids=["wider", "narrower"])
@pytest.mark.parametrize("chunks", [None, 3], ids=["default chunks", "3 chunks"])
def test_fused_forecast_where_output_and_input_differ_in_shape(out_shape, chunks, interpreted, monkeypatch):
    # FLUX's single blocks cache proj_mlp (3072 -> 12288 features): each program sums its chunk of the input and its
    # chunk of the output, the two of their own sizes
    if chunks:
        monkeypatch.setattr(fused, "MIN_CHUNK", fused.BLOCK)
        monkeypatch.setattr(fused, "MAX_CHUNKS", chunks)
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float32, out_shape=out_shape)
    got, want = _both(predictor, state, inp, k=4)
    assert launches.n == 2 and got.shape == out_shape
    _assert_as_torch(got, want)


def test_fused_forecast_of_strided_tensors_reads_them_in_order(interpreted, monkeypatch):
    # ACE-Step's cached modules take a transposed input: it and the stored tensors are copied to flat memory first
    predictor, state, inp = _state(2, torch.float32)
    strided = inp.transpose(1, 2).contiguous().transpose(1, 2)
    state.out.diffs[1] = state.out.diffs[1].transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous() and not state.out.diffs[1].is_contiguous()
    got, want = _both(predictor, state, strided)
    _assert_as_torch(got, want)
    torch.testing.assert_close(got, _both(predictor, state, inp)[0], rtol=0, atol=0)  # what the flat input gives


@pytest.mark.parametrize("ratio", ["trend", "mean"])
def test_fused_forecast_takes_a_subclass_ratio(ratio, interpreted, monkeypatch):
    # RFC+ with Taylor's differences (newton=False) forecasts the ratio itself (``ratio_at``): the kernels use it
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float32, predictor=RelationalPlus(2, newton=False, ratio=ratio))
    got, want = _both(predictor, state, inp, k=2)
    assert launches.n == 2
    _assert_as_torch(got, want)
    plain = Relational(2).forecast(state, inp, numbers_on([step_row(2)], torch.device(DEVICE))[0], k=2.0)
    assert not torch.allclose(got, plain)  # not RFE's latest ratio


def test_the_environment_switches_it_on_and_another_device_is_told_once(interpreted, monkeypatch):
    monkeypatch.setattr(fused, "_enabled", None)
    for value, on in (("1", True), ("true", True), ("On", True), ("0", False), ("", False)):
        monkeypatch.setenv(fused.ENV, value)
        assert fused.enabled() is on
    monkeypatch.setenv(fused.ENV, "1")
    monkeypatch.setattr(fused, "_interpreting", lambda: False)  # as on a machine without a GPU nor the interpreter
    monkeypatch.setattr(fused, "_told_device", False)
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float32)
    if inp.is_cuda:
        pytest.skip("the inputs are on a GPU here")
    row = numbers_on([step_row(2)], torch.device(DEVICE))[0]
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="needs a CUDA device"):
        predictor.forecast(state, inp, row, k=2.0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.forecast(state, inp, row, k=2.0)  # said once
    assert launches.n == 0


def test_fused_forecast_over_chunks_of_several_blocks(interpreted, monkeypatch):
    # two chunks per sample of two blocks of 1024 each, the second chunk's second block partial; then one chunk of
    # three blocks
    monkeypatch.setattr(fused, "MIN_CHUNK", fused.BLOCK)
    monkeypatch.setattr(fused, "MAX_CHUNKS", 2)
    assert fused._chunks(2560, 2, torch.device(DEVICE)) == (2048, 2)
    predictor, state, inp = _state(2, torch.float32)
    _assert_as_torch(*_both(predictor, state, inp))
    monkeypatch.setattr(fused, "MAX_CHUNKS", 1)
    assert fused._chunks(2560, 2, torch.device(DEVICE)) == (3072, 1)
    _assert_as_torch(*_both(predictor, state, inp))


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


def test_a_float16_coefficient_past_its_range_is_clamped_as_the_torch_path_clamps(interpreted, monkeypatch):
    """A float16 forecast whose coefficient ``s · ‖ΔI‖ / ‖u‖`` passes 65504 (a ratio of about 1e6, an input that
    barely moved between the full steps): the torch path clamps it to float16's largest finite value
    (``history.narrowed``), so where the direction is zero the forecast is the base. Rounded to float16 unclamped,
    the coefficient was inf and inf · 0 NaN there (the kernel's own rounding, found by review)."""
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float16)
    state.ratio = state.ratio * 1e6
    for d in state.out.diffs[1:]:
        d[..., :8] = 0  # u = D_1 + (k/2) D_2 is zero on these elements
    got, want = _both(predictor, state, inp)
    assert launches.n == 2
    base = state.out.base(torch.float16)
    assert not want.isnan().any() and torch.equal(want[..., :8], base[..., :8])
    assert not got.isnan().any() and torch.equal(got[..., :8], base[..., :8])
    assert torch.equal(got.isinf(), want.isinf())


def test_a_direction_holding_an_infinity_falls_back_to_taylor_as_the_torch_path_does(interpreted, monkeypatch):
    """float16 differences holding an inf (an overflow recorded at a full step): ``‖u‖ = inf`` made the coefficient
    0 (finite), the forecast the base and NaN at the element; both paths take Taylor's ``k`` there instead."""
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float16)
    state.out.diffs[2][1, 0, 0] = float("inf")
    got, want = _both(predictor, state, inp)
    assert launches.n == 2
    assert not want.isnan().any() and not got.isnan().any()
    assert torch.equal(got.isinf(), want.isinf()) and want[1].isinf().any() and not want[0].isinf().any()
    _assert_as_torch(got.nan_to_num(posinf=0.0), want.nan_to_num(posinf=0.0))


def test_fused_forecast_stays_off_where_it_does_not_apply(interpreted, monkeypatch):
    launches = _Launches(monkeypatch, interpreted)
    predictor, state, inp = _state(2, torch.float32)
    row = numbers_on([step_row(2)], torch.device(DEVICE))[0]
    with torch.enable_grad():  # autograd records the forecast: the torch path
        predictor.forecast(state, inp, row, k=2.0)
    with torch.no_grad():
        predictor.forecast(state, inp, row)  # no k on the host (compiled or captured callers): the torch path
        predictor.forecast(state, inp.double(), row, k=2.0)  # float64
        state.gram = torch.ones(2, 2, 2, device=DEVICE)  # recorded compiled: its Gram gives ‖u‖
        predictor.forecast(state, inp, row, k=2.0)
        state.gram = None
        fused.set_enabled(False)
        predictor.forecast(state, inp, row, k=2.0)
        fused.set_enabled(True)
        narrow = _state(2, torch.float32, storage=CacheStorage(INT8, INT8, INT8))  # scaled int8 caches
        narrow[0].forecast(narrow[1], narrow[2], row, k=2.0)
    assert launches.n == 0
    with torch.no_grad():  # and on where it applies
        predictor.forecast(state, inp, row, k=2.0)
    assert launches.n == 2


def test_a_failing_kernel_warns_once_and_the_torch_path_takes_over(interpreted, monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no kernel today")

    monkeypatch.setattr(interpreted, "_stats", Broken())
    predictor, state, inp = _state(2, torch.float32)
    with pytest.warns(RuntimeWarning, match="fused RFE forecast failed.*no kernel today"):
        got, want = _both(predictor, state, inp, ran=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _both(predictor, state, inp, ran=False)  # said once; the torch path from then on
    assert not fused.enabled()
    fused.set_enabled(True)  # forgets the failure
    assert fused.enabled()


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
    model = tiny_dit().to(DEVICE)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    labels = torch.tensor([1, 2], device=DEVICE)
    relcache.enable(model, config)
    relcache.begin_generation(model, num_steps=steps)
    outs, ops = [], _Ops()
    try:
        with torch.no_grad():
            for i in range(steps):
                t = torch.full((2,), 999 - 20 * i, device=DEVICE)
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


@pytest.mark.skipif(ON_GPU, reason="the tiny pipelines run on the CPU: a check for Triton's interpreter")
@pytest.mark.parametrize("family", ["dit", "flux", "sd3", "ace_step"])
def test_a_family_generates_the_same_with_the_fused_forecast(family, interpreted):
    # DiT; FLUX, whose single blocks cache proj_mlp (output 4x its input); SD3, whose CFG batch keeps two row groups
    # of joint blocks with two outputs each; ACE-Step, whose modules take a transposed input
    pytest.importorskip("transformers")  # the pipelines' tiny text encoders
    import numpy as np
    from families import CASES, generate

    case = CASES[family]
    outs, ran = [], []
    for on in (False, True):
        fused.set_enabled(on)
        pipe = case.build()
        relcache.enable(pipe, CacheConfig(Relational(2), Interval(3, 1)))
        before = fused.launches
        with torch.no_grad():
            outs.append(generate(pipe, case))
        ran.append(fused.launches - before)
    assert ran[0] == 0 and ran[1] > 0 and fused.enabled()
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)
