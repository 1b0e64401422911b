"""RFC+ pieces (issue 19) against hand-computed values: the Newton-form forecast, the forecast ratio, the preset."""

import dataclasses

import pytest
import torch
from conftest import needs_cxx, run_loop, tiny_dit

import relcache
from relcache import RFC, CacheStorage, ConfigError, InputError, Relational, RFCPlus
from relcache.methods.fit import InputFit
from relcache.methods.history import DiffHistory, step_row
from relcache.methods.plus import Newton, NewtonHistory, NewtonInputError, RelationalPlus, newton_forecast


def _quadratic(t: float) -> torch.Tensor:
    return torch.tensor([[3.0 - 2.0 * t + 0.5 * t * t]], dtype=torch.float64)


def test_newton_form_is_exact_on_a_quadratic_with_uneven_gaps_where_the_spec_taylor_form_is_not():
    # f(t) = 3 - 2t + t^2/2 at t = 0, 1, 5 (gaps 1 and 4); f(8) = 19.
    # Newton: D1(b) = -1.5, D1(a) = (5.5 - 1.5) / 4 = 1, D2 = (1 + 1.5) / (4 + 1) = 0.5;
    #   f(5 + 3) = 5.5 + 3 (1 + (3 + 4) 0.5) = 19.
    # spec Taylor: D2 = (1 + 1.5) / 4 = 0.625; 5.5 + 3 + 0.625 * 9 / 2 = 11.3125.
    ts = [0, 1, 5]
    assert newton_forecast([_quadratic(t) for t in ts], ts, 8, 2).item() == pytest.approx(19.0, abs=1e-12)
    hist = DiffHistory(2)
    for j, t in enumerate(ts):
        hist.update(_quadratic(t), None if j == 0 else torch.tensor(float(t - ts[j - 1]), dtype=torch.float64))
    assert hist.taylor(torch.tensor(step_row(3), dtype=torch.float64), torch.float64).item() == pytest.approx(11.3125)
    newton = NewtonHistory(2)
    for j, t in enumerate(ts):
        newton.update(_quadratic(t), None if j == 0 else torch.tensor(float(t - ts[j - 1]), dtype=torch.float64))
    assert [d.item() for d in newton.diffs] == pytest.approx([5.5, 1.0, 0.5])


def test_newton_form_is_exact_on_a_cubic_at_order_3_and_keeps_only_the_latest_gaps():
    def cubic(t):
        return torch.tensor([[1.0 + t - 0.3 * t**2 + 0.05 * t**3]], dtype=torch.float64)

    ts = [0, 1, 5, 9, 11, 16]  # six records: the forecast uses the last four (gaps 4, 2, 5)
    for t in (17, 20, 27):
        assert newton_forecast([cubic(s) for s in ts], ts, t, 3).item() == pytest.approx(cubic(t).item(), rel=1e-12)
    hist = NewtonHistory(3)
    for j, t in enumerate(ts):
        hist.update(cubic(t), None if j == 0 else torch.tensor(float(t - ts[j - 1]), dtype=torch.float64))
    assert [g.item() for g in hist.gaps] == [5.0, 2.0, 4.0]
    assert hist.diffs[3].item() == pytest.approx(0.05)  # the cubic's leading coefficient


def test_newton_order_1_equals_the_spec_taylor_form():
    ts = [0, 1, 5]
    values = [_quadratic(t) for t in ts]
    newton, taylor = NewtonHistory(1), DiffHistory(1)
    for j, t in enumerate(ts):
        gap = None if j == 0 else torch.tensor(float(t - ts[j - 1]), dtype=torch.float64)
        newton.update(values[j], gap)
        taylor.update(values[j], gap)
    row = torch.tensor(step_row(3), dtype=torch.float64)
    assert torch.equal(newton.taylor(row, torch.float64), taylor.taylor(row, torch.float64))
    assert newton.taylor(row, torch.float64).item() == pytest.approx(5.5 + 3 * 1.0)


def test_newton_predictor_matches_the_history_and_restarts_on_a_new_shape():
    pred = Newton(2)
    state = pred.new_state()
    for t in (0, 1, 5):
        pred.update(state, t, _quadratic(t), _quadratic(t))
    assert pred.predict(state, 8, 50, _quadratic(8)).item() == pytest.approx(19.0)
    pred.update(state, 9, torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    assert state.out.order == 0 and state.out.gaps == []


def _fed(pred, steps, inputs, outputs):
    state = pred.new_state()
    for t, i, o in zip(steps, inputs, outputs, strict=True):
        pred.update(state, t, torch.tensor([[i]], dtype=torch.float64), torch.tensor([[o]], dtype=torch.float64))
    return state


@pytest.mark.parametrize("ratio,clip,expected", [
    # s(b) = (1 - 0) / (1 - 0) = 1 over [0, 2]; s(a) = (3 - 1) / (2 - 1) = 2 over [2, 6]; order 1: u = (3 - 1) / 4 > 0;
    # at step 8 (k = 2) with input 4: |I - I(a)| = 2, so the forecast is 3 + 2 s.
    ("latest", 2.0, 3 + 2 * 2.0),                       # RFE: s = 2
    ("mean", 2.0, 3 + 2 * 1.5),                         # (2 + 1) / 2
    ("trend", 2.0, 3 + 2 * 3.0),                        # 2 + (2 - 1) (4 + 2) / (4 + 2) = 3
    ("trend", 1.2, 3 + 2 * 2.4),                        # clipped to 2 * 1.2
])
def test_forecast_ratio_hand_computed(ratio, clip, expected):
    pred = RelationalPlus(1, newton=False, ratio=ratio, clip=clip)
    state = _fed(pred, [0, 2, 6], [0.0, 1.0, 2.0], [0.0, 1.0, 3.0])
    assert state.ratio.item() == pytest.approx(2.0) and state.ratio_prev.item() == pytest.approx(1.0)
    assert [g.item() for g in state.ratio_gaps] == [4.0, 2.0]
    got = pred.predict(state, 8, 50, torch.tensor([[4.0]], dtype=torch.float64))
    assert got.item() == pytest.approx(expected)


def test_trend_ratio_grows_with_k_and_falls_back_to_the_latest_ratio():
    pred = RelationalPlus(1, newton=False, ratio="trend", clip=10.0)
    state = _fed(pred, [0, 2, 6], [0.0, 1.0, 2.0], [0.0, 1.0, 3.0])
    # k = 5: s = 2 + (5 + 4) / 6 = 3.5; |I - I(a)| = 1 -> 3 + 3.5
    assert pred.predict(state, 11, 50, torch.tensor([[3.0]], dtype=torch.float64)).item() == pytest.approx(6.5)
    # only two records: s(b) unknown, so the latest ratio (RFE): s(a) = 1 -> 1 + 1 * |3 - 1|
    two = _fed(pred, [0, 2], [0.0, 1.0], [0.0, 1.0])
    assert two.ratio_prev is None
    assert pred.predict(two, 4, 50, torch.tensor([[3.0]], dtype=torch.float64)).item() == pytest.approx(3.0)
    # a non-finite trend (s(b) infinite: the input did not move over [0, 2]) falls back to s(a) = 2
    inf = _fed(pred, [0, 2, 6], [0.0, 0.0, 1.0], [0.0, 1.0, 3.0])
    assert torch.isinf(inf.ratio_prev).all()
    assert pred.predict(inf, 8, 50, torch.tensor([[3.0]], dtype=torch.float64)).item() == pytest.approx(3 + 2 * 2)


def test_relational_plus_latest_ratio_taylor_direction_is_rfe_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 3, generator=g) for _ in range(4)]
    ys = [torch.randn(2, 5, 3, generator=g) for _ in range(4)]
    rfe, plus = relcache.Relational(2), RelationalPlus(2, newton=False, ratio="latest")
    sa, sb = rfe.new_state(), plus.new_state()
    for t, x, y in zip([0, 1, 4, 6], xs, ys, strict=True):
        rfe.update(sa, t, x, y)
        plus.update(sb, t, x, y)
    probe = torch.randn(2, 5, 3, generator=g)
    assert torch.equal(rfe.predict(sa, 9, 50, probe), plus.predict(sb, 9, 50, probe))


def test_newton_rcs_sees_no_error_on_a_quadratic_probe_where_rcs_does():
    # probes q(i) = 1 + 0.1 i + 0.02 i^2: after full steps 0, 1, 2 (step 2: the order-1 forecast misses), the
    # Newton forecast is exact, while the spec's Taylor form misses by the Newton term (-D2 N k / 2 per step)
    probes = [torch.full((2, 4), 1.0 + 0.1 * i + 0.02 * i * i, dtype=torch.float64) for i in range(12)]
    newton, plain = NewtonInputError(threshold=1e-9), InputError(threshold=1e-9)
    sn, sp = newton.new_state(12), plain.new_state(12)
    full_n = [i for i, p in enumerate(probes) if newton.decide(sn, i, p)]
    full_p = [i for i, p in enumerate(probes) if plain.decide(sp, i, p)]
    assert full_n == [0, 1, 2]
    assert max(sn.errors[i] for i in range(3, 12)) < 1e-12
    assert full_p == list(range(12))
    assert isinstance(sn.history, NewtonHistory)
    newton.release(sn)
    assert isinstance(sn.history, NewtonHistory) and not sn.history.ready


@pytest.mark.parametrize("target", [3, 5])
def test_rfcplus_meets_the_target_nfc_on_a_tiny_dit(target):
    model = tiny_dit()
    x, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    full = run_loop(model, x, labels, steps=12)
    with relcache.cached(model, RFCPlus(target_nfc=target)):
        outs = run_loop(model, x, labels, steps=12)
        stats = relcache.stats(model)
    assert stats.nfc == target and stats.full_steps[:2] == [0, 1]
    assert torch.equal(outs[0], full[0]) and all(torch.isfinite(o).all() for o in outs)
    assert stats.method.startswith(f"RFC+(NFC={target}, m=2)")


def test_rfcplus_takes_rfcs_arguments_and_rejects_what_rfc_rejects():
    cfg = RFCPlus(order=3, threshold=0.2, warmup=3, max_skip=4)
    assert type(cfg.schedule) is InputError and cfg.predictor == RelationalPlus(3, newton=True, ratio="trend", clip=2.0)
    assert (cfg.predictor.order, cfg.schedule.order, cfg.schedule.threshold, cfg.schedule.warmup,
            cfg.schedule.max_skip) == (3, 3, 0.2, 3, 4)
    assert cfg.name == "RFC+(tau=0.2, m=3)"
    for kwargs in ({}, {"threshold": 0.1, "target_nfc": 10}, {"threshold": -0.1}, {"order": 0, "threshold": 0.1},
                   {"threshold": 0.1, "max_skip": 0}, {"target_nfc": 1}):
        with pytest.raises(ConfigError) as plus_err:
            RFCPlus(**kwargs)
        with pytest.raises(ConfigError) as rfc_err:
            RFC(**kwargs)
        assert str(plus_err.value) == str(rfc_err.value)
    with pytest.raises(ConfigError, match=r"ratio must be one of 'latest', 'trend', 'mean', got 'last'"):
        RelationalPlus(2, ratio="last")
    with pytest.raises(ConfigError, match=r"clip must be a number >= 1, got 0.5"):
        RelationalPlus(2, clip=0.5)


def test_input_fit_is_exact_for_a_linear_module_whose_input_moves_in_the_span_of_recorded_moves():
    """O = W·I: after three full steps the state holds two input moves and their outputs' moves; an input that moved
    by 0.7 and -1.9 of them is forecast exactly (and RFE, which takes only the magnitude, is not), per sample."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, dtype=torch.float64)
    steps = [torch.randn(3, 5, 8, dtype=torch.float64) for _ in range(3)]  # I at full steps 0, 2, 4
    pred, rfe = InputFit(2, ridge=0.0), Relational(2)
    st, st_rfe = pred.new_state(), rfe.new_state()
    for j, x in enumerate(steps):
        pred.update(st, 2 * j, x, x @ w.T)
        rfe.update(st_rfe, 2 * j, x, x @ w.T)
    x_now = steps[2] + 0.7 * (steps[2] - steps[1]) - 1.9 * (steps[1] - steps[0])
    got = pred.predict(st, 6, None, x_now)
    torch.testing.assert_close(got, x_now @ w.T)
    assert (rfe.predict(st_rfe, 6, None, x_now) - x_now @ w.T).abs().max() > 0.1
    scaled = InputFit(2, ridge=0.0, scale=True)  # the same direction, its length rescaled to RFE's s·‖v‖
    st_s = scaled.new_state()
    for j, x in enumerate(steps):
        scaled.update(st_s, 2 * j, x, x @ w.T)
    ratio = st_s.ratio * (x_now - steps[2]).flatten(1).norm(dim=1)
    torch.testing.assert_close((scaled.predict(st_s, 6, None, x_now) - steps[2] @ w.T).flatten(1).norm(dim=1), ratio)
    blend = InputFit(2, ridge=0.0, blend=True)  # the fit explains all of the move (R² = 1): RFE gets no weight
    st_b = blend.new_state()
    for j, x in enumerate(steps):
        blend.update(st_b, 2 * j, x, x @ w.T)
    torch.testing.assert_close(blend.predict(st_b, 6, None, x_now), x_now @ w.T)


def _spec_ratio(s, prev, n_a, n_b, k, ratio, clip):
    """docs/spec.md's forecast ratio as written there: the trend (or mean), ``s(a)`` where it is not finite, clipped."""
    est = s + (s - prev) * (n_a + k) / (n_a + n_b) if ratio == "trend" else (s + prev) / 2
    est = torch.where(torch.isfinite(est), est, s)
    return torch.minimum(torch.maximum(est, s / clip), s * clip)


@pytest.mark.parametrize("ratio", ["trend", "mean"])
def test_folded_ratio_forecast_equals_the_spec_formula_including_its_fallbacks(ratio):
    # per sample: ordinary, a slope that the clip cuts, s(b) infinite (trend not finite: s(a)), s(a) infinite, NaN,
    # and a falling trend that the lower bound cuts
    pred = RelationalPlus(2, ratio=ratio, clip=1.5)
    state = pred.new_state()
    s = torch.tensor([2.0, 2.0, 2.0, float("inf"), float("nan"), 2.0], dtype=torch.float64)
    prev = torch.tensor([1.5, 0.1, float("inf"), 1.0, 1.0, 3.9], dtype=torch.float64)
    for n_a, n_b in ((4.0, 2.0), (0.0, 0.0)):  # zero gaps: no trend can be measured, s(a)
        state.ratio, state.ratio_prev = s, prev
        state.ratio_gaps = (torch.tensor(n_a, dtype=torch.float64), torch.tensor(n_b, dtype=torch.float64))
        for k in (1, 3, 7):
            row = torch.tensor(step_row(k), dtype=torch.float64)
            want = _spec_ratio(s, prev, n_a, n_b, k, ratio, 1.5)
            state.ratio_line = pred._fold(state)  # folded at the record
            torch.testing.assert_close(pred.forecast_ratio(state, row), want, rtol=1e-12, atol=0, equal_nan=True)
            state.ratio_line = None  # the ratio came after the record (a split sequence): folded at the forecast
            torch.testing.assert_close(pred.forecast_ratio(state, row), want, rtol=1e-12, atol=0, equal_nan=True)
    if ratio == "trend":  # by hand at k = 3: 2 + 0.5 (4 + 3) / 6 = 2.5833..; 2 + 1.9 * 7 / 6 clipped to 3; 2;
        # 2 - 1.9 * 7 / 6 = -0.2167 clipped to 2 / 1.5
        state.ratio_gaps = (torch.tensor(4.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
        state.ratio_line = pred._fold(state)
        got = pred.forecast_ratio(state, torch.tensor(step_row(3), dtype=torch.float64))
        assert got[[0, 1, 2, 5]].tolist() == pytest.approx([2 + 0.5 * 7 / 6, 3.0, 2.0, 2 / 1.5])


@needs_cxx
def test_mean_ratio_fallback_survives_compile():
    """The mean of ``s(a)`` and ``s(b)`` falls back to ``s(a)`` where it is not finite, compiled too (inductor
    simplifies ``x * 0`` to ``0``, which would make a mask written so ``True`` everywhere)."""
    pred = RelationalPlus(2, ratio="mean", clip=4.0)
    state = pred.new_state()
    state.ratio_gaps = (torch.tensor(4.0), torch.tensor(2.0))
    row = torch.tensor(step_row(3))

    def fold_and_forecast(s, prev):
        state.ratio, state.ratio_prev = s, prev
        state.ratio_line = pred._fold(state)
        return pred.forecast_ratio(state, row)

    s, prev = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([3.0, float("inf"), float("nan")])
    want = torch.tensor([2.5, 2.0, 2.0])
    torch.testing.assert_close(fold_and_forecast(s, prev), want)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fold_and_forecast, fullgraph=True)(s, prev), want)
    torch._dynamo.reset()


@needs_cxx
def test_blend_fallbacks_survive_compile():
    """InputFit's blend zeroes a non-finite R² or RFE increment, compiled too: sample 1's input does not move at the
    forecast (R² = 0 / 0), sample 2's output never moved (RFE's increment 0 / 0)."""
    g = torch.Generator().manual_seed(3)
    pred = InputFit(2, blend=True)
    state = pred.new_state()
    ins = [torch.randn(3, 4, 5, generator=g) for _ in range(3)]
    outs = [torch.randn(3, 4, 5, generator=g) for _ in range(3)]
    for j in range(3):
        outs[j][2] = 1.0
    for j in range(3):
        pred.update(state, 2 * j, ins[j], outs[j])
    inp = torch.randn(3, 4, 5, generator=g)
    inp[1] = ins[2][1]
    row = torch.tensor(step_row(2))
    eager = pred.forecast(state, inp, row)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(eager[2], outs[2][2])  # nothing moved: O(a)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(lambda x, r: pred.forecast(state, x, r))(inp, row), eager)
    torch._dynamo.reset()


def test_scaled_input_fit_forecasts_the_latest_output_where_the_output_stopped():
    """``scale=True``: a sample whose output did not move over the last gap (s = 0) has the factor s·‖v‖/‖Σ c ΔO‖ = 0,
    so its forecast is O(a), eagerly and compiled (``aot_eager``: the decomposed ops, no C++ needed). An infinite
    G_out / s² made cᵀ G c NaN for coefficients of mixed sign, and the factor fell back to 1 (found by review). Sample
    1 moves on: its forecast is the by-hand formula."""
    def draw(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ins = [torch.randn(1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
        outs = [torch.randn(1, 4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
        return ins, outs, torch.randn(1, 4, 3, generator=g, dtype=torch.float64)

    (i0, o0, n0), (i1, o1, n1) = draw(3), draw(4)  # seed 3: fitted coefficients of mixed sign
    o0.append(o0[1].clone())  # sample 0's output did not move over the last gap
    o1.append(torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    ins = [torch.cat([a, b]) for a, b in zip(i0, i1, strict=True)]
    outs = [torch.cat([a, b]) for a, b in zip(o0, o1, strict=True)]
    pred = InputFit(2, scale=True)
    state = pred.new_state()
    for t in range(3):
        pred.update(state, t, ins[t], outs[t])
    inp = ins[2] + 0.3 * torch.cat([n0, n1])
    row = torch.tensor(step_row(1), dtype=torch.float64)
    eager = pred.forecast(state, inp.clone(), row)
    assert torch.equal(eager[0], outs[2][0])
    bi = torch.stack([(ins[2] - ins[1])[1].flatten(), (ins[1] - ins[0])[1].flatten()])
    bo = torch.stack([(outs[2] - outs[1])[1].flatten(), (outs[1] - outs[0])[1].flatten()])
    gram = bi @ bi.T
    c = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(2, dtype=torch.float64),
                           bi @ (inp - ins[2])[1].flatten())
    inc = c @ bo
    fac = bo[0].norm() / bi[0].norm() * (inp - ins[2])[1].norm() / inc.norm()
    torch.testing.assert_close(eager[1], outs[2][1] + (fac * inc).reshape(4, 3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: pred.forecast(state, x, r), backend="aot_eager")(inp.clone(), row)
    torch._dynamo.reset()
    assert torch.equal(compiled[0], outs[2][0])
    torch.testing.assert_close(compiled, eager)


def _operators(fn) -> int:
    """Operators ``fn`` dispatches, views excluded (a kernel launch each on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        fn()
    return Count.n


def test_rfcplus_forecast_launches_at_most_three_operators_more_than_rfe():
    # Newton's Horner multiplier k + G_1, the ratio line A + B k and its clip: the trend is folded at the full step
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 16, 8, generator=g) for _ in range(4)]
    counts = {}
    for pred in (Relational(2), RelationalPlus(2)):
        state = pred.new_state()
        for t, x in zip([0, 1, 5, 11], xs, strict=True):  # uneven gaps, as RCS makes them
            pred.update(state, t, x, x * 2 + 1)
        row = torch.tensor(step_row(3))
        counts[type(pred).__name__] = _operators(lambda p=pred, s=state, r=row: p.forecast(s, xs[-1] + 0.1, r))
    assert counts["RelationalPlus"] <= counts["Relational"] + 3, counts


def _fit_by_hand(ins, outs, now, ridge, scale):
    """docs/spec.md's input-fitted forecast written out per sample in float64: least squares in the span of the last
    (up to two) input moves, the same combination of output moves, rescaled to ``s · ‖v‖`` with ``scale``."""
    d_in = [ins[-1 - j] - ins[-2 - j] for j in range(min(2, len(ins) - 1))]
    d_out = [outs[-1 - j] - outs[-2 - j] for j in range(len(d_in))]
    got = []
    for b in range(now.shape[0]):
        basis = torch.stack([d[b].flatten().double() for d in d_in])
        gram = basis @ basis.T
        v = (now[b] - ins[-1][b]).flatten().double()
        c = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(len(d_in), dtype=gram.dtype),
                               basis @ v)
        inc = sum(c[j] * d_out[j][b].double() for j in range(len(d_in)))
        if scale:
            s = d_out[0][b].double().norm() / d_in[0][b].double().norm()
            inc = inc * s * v.norm() / inc.norm()
        got.append(outs[-1][b].double() + inc)
    return torch.stack(got).to(now.dtype)


@pytest.mark.parametrize("scale", [False, True])
def test_input_fit_equals_the_formula_by_hand_on_a_nonlinear_module(scale):
    """The lean forecast (Grams and the inverse taken at the full step, batched products at the cached step) equals
    the spec's least-squares forecast computed directly, after one recorded move and after three (two kept)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 6, generator=g) / 2
    ins = [torch.randn(2, 4, 6, generator=g) for _ in range(4)]
    outs = [torch.tanh(x @ w.T) * 2 for x in ins]
    now = ins[-1] + 0.3 * torch.randn(2, 4, 6, generator=g)
    pred = InputFit(2, ridge=1e-3, scale=scale)
    for count in (2, 4):
        st = pred.new_state()
        for j in range(count):
            pred.update(st, 3 * j, ins[j], outs[j])
        want = _fit_by_hand(ins[:count], outs[:count], now, 1e-3, scale)
        torch.testing.assert_close(pred.predict(st, 3 * count - 1, None, now), want, rtol=1e-5, atol=1e-5)


def test_input_fit_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="give scale=True or blend=True, not both"):
        InputFit(2, scale=True, blend=True)
    with pytest.raises(ConfigError, match="ridge must be a number >= 0"):
        InputFit(2, ridge=-1)
    with pytest.raises(ConfigError, match="keeps its caches as computed"):
        InputFit(2).new_state(CacheStorage(torch.bfloat16, torch.bfloat16, torch.bfloat16))
    with pytest.raises(ConfigError, match="InputFit keeps its caches as computed: give no cache_dtype"):
        dataclasses.replace(RFCPlus(full_steps=[0, 1, 5], fit=True), cache_dtype=torch.bfloat16)  # before any run


def _fit_state(pred, ins, outs):
    st = pred.new_state()
    for j, (x, y) in enumerate(zip(ins, outs, strict=True)):
        pred.update(st, 3 * j, x, y)
    return st


def test_input_fit_without_grad_other_dtypes_and_layouts_equals_the_formula():
    """No autograd (the forecast is written over the input's move), a non-contiguous input, and a module that takes
    float32 and returns bfloat16: each equals the formula by hand."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 6, generator=g) / 2
    ins = [torch.randn(2, 4, 6, generator=g) for _ in range(4)]
    outs = [torch.tanh(x @ w.T) * 2 for x in ins]
    now = ins[-1] + 0.3 * torch.randn(2, 4, 6, generator=g)
    pred = InputFit(2, scale=True)
    want = _fit_by_hand(ins, outs, now, 1e-3, True)
    with torch.no_grad():
        got = pred.predict(_fit_state(pred, ins, outs), 11, None, now)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        t_ins = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in ins]  # same values, another layout
        t_now = now.transpose(1, 2).contiguous().transpose(1, 2)
        assert not t_now.is_contiguous()
        torch.testing.assert_close(pred.predict(_fit_state(pred, t_ins, outs), 11, None, t_now), want,
                                   rtol=1e-5, atol=1e-5)
        half = [y.bfloat16() for y in outs]
        got = pred.predict(_fit_state(pred, ins, half), 11, None, now)
        torch.testing.assert_close(got, _fit_by_hand(ins, [y.float() for y in half], now, 1e-3, True),
                                   rtol=2e-2, atol=2e-2)


def test_input_fit_records_and_forecasts_under_autograd():
    """Inputs that need a gradient (autograd on, as in a guidance-by-gradient loop): the record's stacked move is
    built out of place (``out=`` refuses arguments that need a gradient; it raised at the second record); values
    equal the no-grad ones and the gradient reaches the input's weight."""
    g = torch.Generator().manual_seed(6)
    w_in = torch.randn(6, 6, generator=g).requires_grad_()
    w = torch.randn(6, 6, generator=g) / 2
    raw = [torch.randn(2, 4, 6, generator=g) for _ in range(4)]
    now = raw[-1] + 0.3 * torch.randn(2, 4, 6, generator=g)
    pred = InputFit(2, scale=True)
    ins = [x @ w_in for x in raw]
    got = pred.predict(_fit_state(pred, ins, [torch.tanh(x @ w.T) for x in ins]), 11, None, now @ w_in)
    got.sum().backward()
    assert w_in.grad is not None and torch.isfinite(w_in.grad).all() and w_in.grad.abs().sum() > 0
    with torch.no_grad():
        plain = [x @ w_in for x in raw]
        want = pred.predict(_fit_state(pred, plain, [torch.tanh(x @ w.T) for x in plain]), 11, None, now @ w_in)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_input_fit_in_float16_does_not_overflow():
    """Moves of about 40 per element over 20,000 elements: their squared lengths (~3e7) overflow float16's 65504, so
    the products are summed in float32; the forecast equals the float32 one to float16's precision."""
    g = torch.Generator().manual_seed(5)
    ins = [40 * torch.randn(2, 100, 200, generator=g) * (j + 1) for j in range(4)]
    outs = [torch.tanh(x / 100) * 50 for x in ins]
    now = ins[-1] + 30 * torch.randn(2, 100, 200, generator=g)
    pred = InputFit(2, scale=True)
    with torch.no_grad():
        want = pred.predict(_fit_state(pred, ins, outs), 11, None, now)
        got = pred.predict(_fit_state(pred, [x.half() for x in ins], [y.half() for y in outs]), 11, None, now.half())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0.2)


def test_input_fit_with_an_output_that_did_not_move_forecasts_the_latest_output():
    """s = 0 (ΔO_1 = 0): the rescaled increment has length s · ‖v‖ = 0, so the forecast is O(a), not unscaled."""
    g = torch.Generator().manual_seed(6)
    ins = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    outs = [torch.randn(2, 3, 4, generator=g)]
    outs += [outs[0] + 1.0, outs[0] + 1.0]  # moved once, then not
    pred = InputFit(2, scale=True)
    with torch.no_grad():
        got = pred.predict(_fit_state(pred, ins, outs), 8, None, ins[-1] + 0.5)
    torch.testing.assert_close(got, outs[-1])


@pytest.mark.parametrize("scale", [False, True])
def test_input_fit_state_bytes_equals_a_full_state(scale):
    pred = InputFit(2, scale=scale)
    st = _fit_state(pred, [torch.randn(2, 6, 4) for _ in range(4)], [torch.randn(2, 6, 8) for _ in range(4)])
    assert st.nbytes == pred.state_bytes((2, 6, 8), (2, 6, 4), torch.float32, None)


def test_trend_ratio_after_a_record_without_a_gap_falls_back_to_the_latest_ratio():
    """A record with no gap (``gap=None``, as at a first record) starts the history over, so the ratio measured at the
    record after it has no gap ``N_b`` to date its predecessor by: ``s(b)`` counts as missing and ``ŝ = s(a)``.
    Inputs 0, 1, 2 and outputs 0, 1, 3; the second record has no gap, the third a gap of 4: s(a) = (3 - 1) / (2 - 1)
    = 2. At k = 2 with input 4: ‖I - I(a)‖ = 2, order 1 direction (3 - 1) / 4 > 0, so the forecast is 3 + 2 · 2 = 7."""
    pred = RelationalPlus(1, newton=False, ratio="trend")
    state = pred.new_state()

    def one(v):
        return torch.tensor([[float(v)]], dtype=torch.float64)

    pred.record(state, one(0), one(0), None)
    pred.record(state, one(1), one(1), None)
    pred.record(state, one(2), one(3), torch.tensor(4.0, dtype=torch.float64))
    state.step = 6
    assert state.ratio.item() == pytest.approx(2.0)
    assert state.ratio_prev is None and state.ratio_gaps is None and state.ratio_line is None
    assert pred.predict(state, 8, 50, one(4)).item() == pytest.approx(7.0)


def test_scaled_input_fit_whose_newest_moves_are_zero_keeps_the_unscaled_increment():
    """scale=True with ΔI_1 = ΔO_1 = 0: s(a) = ‖ΔO_1‖ / ‖ΔI_1‖ = 0 / 0 is NaN, so the factor
    s(a) · ‖v‖ / ‖Σ c_j ΔO_j‖ is not finite and is 1 (docs/spec.md): the forecast is the fitted increment, not O(a).
    Inputs 0, 1, 1 and outputs 0, 2, 2 at steps 0, 1, 2: ΔI = (0, 1), ΔO = (0, 2). At input 3, v = 2; G_I = [[0, 0],
    [0, 1]], ridge 1e-3 · mean diag 0.5 = 5e-4, so c_2 = 2 / 1.0005 and c_1 = 0: Ô = 2 + 2 · 2 / 1.0005 = 5.998..."""
    pred = InputFit(2, scale=True)
    state = pred.new_state()
    for t, (i, o) in enumerate(((0.0, 0.0), (1.0, 2.0), (1.0, 2.0))):
        pred.update(state, t, torch.tensor([[i]], dtype=torch.float64), torch.tensor([[o]], dtype=torch.float64))
    with torch.no_grad():
        got = pred.predict(state, 3, None, torch.tensor([[3.0]], dtype=torch.float64))
    assert got.item() == pytest.approx(2 + 4 / 1.0005, rel=1e-9)


def test_input_fit_in_bfloat16_sums_the_dot_products_in_float32():
    """bfloat16 with one move of 257 ones, and the input moved by the same: d = <v, ΔI_1> = 257, which bfloat16 (8
    mantissa bits) would round to 256. Summed in float32 (docs/spec.md), c = 257 / 257 = 1 (ridge 0) and the forecast
    is O(a) + ΔO_1 = 0 + 8 = 8; with d rounded it would be 8 · 256 / 257 = 7.969 (7.96875 in bfloat16)."""
    pred = InputFit(1, ridge=0.0)
    state = pred.new_state()
    ones = torch.ones(1, 257, dtype=torch.bfloat16)
    pred.update(state, 0, 0 * ones, -8 * ones)
    pred.update(state, 1, ones, 0 * ones)
    with torch.no_grad():
        got = pred.predict(state, 2, None, 2 * ones)
    assert got.dtype == torch.bfloat16 and torch.equal(got, 8 * ones)
