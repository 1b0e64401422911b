"""float16 models near float16's top (65504): InputFit's dot products and weights, RFE's coefficient, scaled narrow
cache storage, and InputFit(blend=True) on a sample whose recorded moves are zero (found by review)."""

import pytest
import torch

from relcache import CacheStorage, Relational, Reuse
from relcache.methods.fit import InputFit
from relcache.methods.storage import load, store

HALF_MAX = 65504.0


def _fit(pred, ins, outs, now):
    st = pred.new_state()
    for j, (x, y) in enumerate(zip(ins, outs, strict=True)):
        pred.update(st, j, x, y)
    return st, pred.predict(st, len(ins), None, now)


def _linear_case(dtype):
    """A linear module (InputFit is exact on it) fed moves of about 300 per element: their float16 products pass
    65504. The inputs are rounded to float16 first, so both dtypes see the same numbers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g) / 4
    d, e = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    ins = [torch.zeros(1, 8, 16), 300 * d, 300 * d + 300 * e]
    now = 600 * d + 300 * e  # in the span of the recorded moves
    ins, now = [x.half().to(dtype) for x in ins], now.half().to(dtype)
    outs = [(x.float() @ w).half().to(dtype) for x in ins]
    return ins, outs, now


@pytest.mark.parametrize("scale", [False, True])
def test_input_fit_in_float16_with_moves_past_256_equals_the_float32_forecast(scale):
    pred = InputFit(2, scale=scale)
    with torch.no_grad():
        _, want = _fit(pred, *_linear_case(torch.float32))
        _, got = _fit(pred, *_linear_case(torch.float16))
    assert want.abs().max() > 1000 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=1.0)


def test_input_fit_compiled_form_in_float16_with_moves_past_256_equals_the_float32_one():
    """``_compiled`` (the sums of products inductor fuses), run eagerly on the same states."""
    pred = InputFit(2)
    forecasts = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            ins, outs, now = _linear_case(dtype)
            st, _ = _fit(pred, ins, outs, now)
            forecasts.append(pred._compiled(st, now - st.inp, st.out.base(now.dtype)))
    want, got = forecasts
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=1.0)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("compiled_form", [False, True])
def test_input_fit_weight_past_float16_max_is_clamped_not_inf(scale, compiled_form):
    """One recorded move of 2**-10 per element, the input now 1e5 times as far: the weight (1e5) is past 65504, and
    cast to float16 it was inf, inf · 0 = NaN where the output's move is 0. Clamped to 65504, the forecast is
    O(a) + 65504 · ΔO (O(a) = 0 here)."""
    size = 64
    d_in = torch.full((1, size), 2.0 ** -10)
    d_out = torch.zeros(1, size)
    d_out[0, ::2] = 2.0 ** -14
    ins = [torch.zeros(1, size).half(), d_in.half()]
    outs = [(-d_out).half(), torch.zeros(1, size).half()]
    now = (d_in * 100001).half()  # the move is about 1e5 times the recorded one
    pred = InputFit(1, ridge=0.0, scale=scale)
    with torch.no_grad():
        st, got = _fit(pred, ins, outs, now)
        if compiled_form:
            got = pred._compiled(st, now - st.inp, st.out.base(now.dtype))
    want = (d_out * HALF_MAX).half()  # 65504 · 2**-14 = 4 - 2**-9, exact in float16
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_rfe_coefficient_past_float16_max_is_clamped_not_inf():
    """Order 2 at a turning point: u = D_1 + D_2 = 0 but for element 0, where it is 2**-19; c = s · ‖ΔI‖ / ‖u‖ is
    about 8e6. Cast to float16 it was inf, and inf · 0 NaN in the other 63 elements. Clamped to 65504: element 0 is
    2**-20 + 65504 · 2**-19 (rounded to float16: 65504 · 2**-19), the others O(a) = 3."""
    pred = Relational(2)
    st = pred.new_state()
    n = 64
    outs = [torch.zeros(1, n), torch.full((1, n), 2.0), torch.full((1, n), 3.0)]
    outs[1][0, 0], outs[2][0, 0] = 0.0, 2.0 ** -20
    ins = [torch.zeros(1, n), torch.ones(1, n), torch.full((1, n), 2.0)]
    with torch.no_grad():
        for t, (i, o) in enumerate(zip(ins, outs, strict=True)):
            pred.update(st, t, i.half(), o.half())
        got = pred.predict(st, 4, None, torch.full((1, n), 4.0).half())
    want = torch.full((1, n), 3.0).half()
    want[0, 0] = HALF_MAX * 2.0 ** -19
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


# (format, the float16 value stored, what it reads back as): the scale is the smallest power of two s with
# amax / s <= top, and a stored value's product with s is kept within 65504:
# int4: s = 2**14, 60000 / s = 3.66 rounds to 4 (65536: inf), kept at floor(65504 / s) = 3
# int8: s = 2**10, 65408 / s = 63.9 rounds to 64 (65536: inf), kept at 63
# float8_e4m3fn: s = 2**8, 64000 / s = 250 rounds to 256 (65536: inf), kept at 240 (61440 = 1.111b · 2**15)
# float8_e5m2: s = 2, 62016 / s = 31008 rounds to 32768 (65536: inf), kept at 28672 (57344 = 1.11b · 2**15)
_TOP = [("int4", 60000.0, [49152.0, 0.0, 0.0, 0.0]), ("int8", 65408.0, [64512.0, 0.0, 0.0, 0.0]),
        (torch.float8_e4m3fn, 64000.0, [61440.0, 1.0, -3.0, 0.5]),
        (torch.float8_e5m2, 62016.0, [57344.0, 1.0, -3.0, 0.5])]


@pytest.mark.parametrize("fmt,value,back", _TOP)
def test_narrow_storage_of_float16_near_its_top_reads_back_finite(fmt, value, back):
    x = torch.tensor([[value, 1.0, -3.0, 0.5]], dtype=torch.float16)
    got = load(store(x, fmt, "token"), torch.float16)
    assert got.dtype == torch.float16 and torch.equal(got, torch.tensor([back], dtype=torch.float16))


def test_narrow_storage_of_float32_near_float16_top_is_as_before():
    """A float32 model keeps the grid's rounding up: 65408 / 2**10 rounds to 64, 65536 (finite in float32)."""
    x = torch.tensor([[65408.0, 1.0, -3.0, 0.5]])
    assert torch.equal(load(store(x, "int8", "token"), torch.float32), torch.tensor([[65536.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("fmt,x", [
    # e5m2's top is 57344: a token under 57344 · 2**-24 (about 3.4e-3) had s < 2**-24, 0 in float16, and read as 0
    (torch.float8_e5m2, [2.0 ** -10, -(2.0 ** -11), 1.5 * 2.0 ** -12, 2.0 ** -20]),
    # int8: a token under 127 · 2**-25 had s = 2**-25: now s = 2**-24 and every float16 value there is an integer
    # multiple of it
    ("int8", [50 * 2.0 ** -24, -3 * 2.0 ** -24, 2.0 ** -24, 0.0]),
])
def test_narrow_storage_of_a_small_float16_token_reads_back_exactly(fmt, x):
    t = torch.tensor([x], dtype=torch.float16)
    got = load(store(t, fmt, "token"), torch.float16)
    assert torch.equal(got, t)


def test_int4_cache_of_a_float16_output_near_its_top_forecasts_finite():
    """Through a predictor state: FORA with int4 storage reads 60000 back as 49152 (one step of its grid), not inf."""
    pred = Reuse()
    st = pred.new_state(CacheStorage("int4", "int4", "int4"))
    out = torch.tensor([[[60000.0, 1.0, -3.0, 0.5]]], dtype=torch.float16)
    with torch.no_grad():
        pred.update(st, 0, out, out)
        got = pred.predict(st, 1, None, out)
    assert torch.equal(got, torch.tensor([[[49152.0, 0.0, 0.0, 0.0]]], dtype=torch.float16))


def test_input_fit_blend_with_a_sample_whose_moves_are_zero_forecasts_its_latest_output():
    """Sample 1's recorded input moves are all zero (its latents did not move): the blend's system is singular, and
    ``torch.linalg.solve`` raised. Its coefficients are 0 now (the lean path's zeroed inverse), so its forecast is
    O(a); sample 0's is what it is alone in the batch."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 6, generator=g) / 2
    ins = [torch.randn(2, 4, 6, generator=g) for _ in range(4)]
    for x in ins:
        x[1] = 0.5  # sample 1 never moves
    outs = [torch.tanh(x @ w) for x in ins]
    now = torch.randn(2, 4, 6, generator=g)
    now[1] = 0.5
    pred = InputFit(2, blend=True)
    with torch.no_grad():
        _, got = _fit(pred, ins, outs, now)
        _, alone = _fit(pred, [x[:1] for x in ins], [y[:1] for y in outs], now[:1])
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], outs[-1][1])
    torch.testing.assert_close(got[:1], alone, rtol=1e-6, atol=1e-6)


def _read_unclipped(x: torch.Tensor, fmt, scale: torch.Tensor) -> torch.Tensor:
    """What storing ``x`` with ``scale`` read back before the clip, in float64 (where nothing overflows)."""
    y = x.double() / scale
    if fmt in ("int4", "int8"):
        top = 7 if fmt == "int4" else 127
        return torch.round(y).clamp(-top, top) * scale
    return y.float().to(fmt).double() * scale


@pytest.mark.parametrize("fmt", ["int4", "int8", torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                 torch.float8_e5m2fnuz])
def test_every_large_float16_value_at_every_scale_reads_back_finite_and_as_before_where_that_was_finite(fmt):
    """Tokens ``[a, x]``: ``a`` the largest float16 whose scale is each of the four largest a float16 token can get,
    ``x`` every float16 value from 2**10 to ``a``. Each reads back finite; where the unclipped read was finite, as it
    was; where it was not, as the largest value of the scale's grid within 65504."""
    top = {"int4": 7.0, "int8": 127.0}.get(fmt) or torch.finfo(fmt).max
    largest = 2.0 ** torch.ceil(torch.log2(torch.tensor(HALF_MAX / top))).item()
    halves = torch.arange(2 ** 10, 2 ** 15 - 2 ** 10, dtype=torch.int16).view(torch.float16)  # every positive float16
    for s in (largest, largest / 2, largest / 4, largest / 8):
        a = halves[halves <= min(HALF_MAX, top * s)].max()
        xs = halves[(halves >= 2 ** 10) & (halves <= a)]
        tokens = torch.stack([a.expand(xs.shape), xs], -1)
        got = load(store(tokens, fmt, "token"), torch.float16)
        assert torch.isfinite(got).all()
        before = _read_unclipped(tokens, fmt, torch.tensor(s, dtype=torch.float64))
        kept = before <= HALF_MAX
        assert torch.equal(got.double()[kept], before[kept])
        if not kept.all():  # the grid's largest point within 65504 (the mantissa's, for a float format)
            ceiling = before[kept].max()
            assert (got.double()[~kept] == ceiling).all()


@pytest.mark.parametrize("host_k", [True, False], ids=["k on the host", "k on the device"])
def test_rfe_direction_holding_a_recorded_overflow_falls_back_to_taylor(host_k):
    """An RFE forecast whose direction ``u`` holds an infinite element (a float16 output that overflowed at a full
    step, carried in ``D_2`` through the next records) with a finite ratio: ``‖u‖ = inf`` made ``c = s ‖ΔI‖ / ‖u‖``
    0, a finite coefficient, so the forecast was ``O(a)`` for the whole sample and NaN (``0 · inf``) at the element.
    The spec's fallback for any non-finite value applies instead: Taylor's ``O(a) + k u`` (inf at that element,
    which a float16 model's clip turns into 65504; NaN it cannot)."""
    pred = Relational(2)
    st = pred.new_state()
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(1, 4, 8, generator=g).half() for _ in range(4)]
    outs[1][0, 0, 0], outs[2][0, 0, 0], outs[3][0, 0, 0] = 60000, -60000, 0  # D_1 = -120000: inf in float16
    with torch.no_grad():
        for j, y in enumerate(outs):
            pred.update(st, j, torch.randn(1, 4, 8, generator=g).half(), y)
        d = [st.out.get(j, torch.float16) for j in range(3)]
        assert torch.isinf(d[2][0, 0, 0]) and torch.isfinite(d[1]).all() and torch.isfinite(st.ratio).all()
        now = torch.randn(1, 4, 8, generator=g).half()
        if host_k:
            got = pred.predict(st, 5, None, now)
        else:
            got = pred.forecast(st, now, torch.tensor([2.0, 1.0, 2 / 3, 0.5, 0.0]), None)
    k = torch.tensor(2.0, dtype=torch.float16)
    taylor = torch.addcmul(d[0], k, torch.addcmul(d[1], k / 2, d[2]))
    assert not got.isnan().any()
    assert torch.equal(got, taylor)
