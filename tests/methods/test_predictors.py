"""Predictors against hand-computed values (docs/spec.md, §Predictors and §Taylor forecast)."""

import numpy as np
import pytest
import torch
from conftest import needs_cxx

from relcache import ConfigError, Linear, Relational, Reuse, Taylor
from relcache.methods.history import DiffHistory, step_row
from relcache.methods.predictors import rising_weight


def _feed(pred, steps, outs, ins=None):
    state = pred.new_state()
    for j, (s, o) in enumerate(zip(steps, outs, strict=True)):
        pred.update(state, s, ins[j] if ins is not None else o, o)
    return state


def test_reuse_returns_last_full_output():
    pred = Reuse()
    outs = [torch.randn(2, 3, 4) for _ in range(3)]
    state = _feed(pred, [0, 1, 4], outs)
    assert torch.equal(pred.predict(state, 7, 10, torch.zeros(2, 3, 4)), outs[2])


def test_divided_differences_hand_computed_with_irregular_gaps():
    h = DiffHistory(3)
    vals = {0: 1.0, 2: 5.0, 7: 2.0, 8: 4.0}
    last = None
    for s, v in vals.items():
        h.update(torch.tensor([[v]]), None if last is None else torch.tensor(float(s - last)))
        last = s
    # D1 at 2: (5-1)/2 = 2; at 7: (2-5)/5 = -0.6; at 8: (4-2)/1 = 2
    # D2 at 7: (-0.6-2)/5 = -0.52; at 8: (2-(-0.6))/1 = 2.6; D3 at 8: (2.6-(-0.52))/1 = 3.12
    assert [float(d) for d in h.diffs] == pytest.approx([4.0, 2.0, 2.6, 3.12])
    assert h.gap == 1 and h.order == 3
    k = 3
    expect = 4.0 + 2.0 * k + 2.6 * k**2 / 2 + 3.12 * k**3 / 6
    assert float(h.taylor(torch.tensor(step_row(k)), torch.float32)) == pytest.approx(expect)


def test_order_grows_as_full_steps_accumulate():
    h = DiffHistory(2)
    h.update(torch.ones(1, 1), None)
    assert h.order == 0 and h.direction(torch.tensor(step_row(1)), torch.float32) is None
    h.update(torch.ones(1, 1), torch.tensor(3.0))
    assert h.order == 1
    h.update(torch.ones(1, 1), torch.tensor(3.0))
    assert h.order == 2


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_exact_on_linear_outputs_with_irregular_steps(order):
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    steps = [0, 1, 3, 7]
    state = _feed(Taylor(order), steps, [a + b * s for s in steps])
    for i in (8, 9, 12):
        torch.testing.assert_close(Taylor(order).predict(state, i, 20, a), a + b * i)


def test_taylor_order2_on_quadratic_matches_the_spec_formula():
    """O(i) = A + B i + C i^2 with full steps every N. The spec's backward differences give D1 = B + C(2a - N),
    D2 = 2C, so the order-2 forecast is O(a+k) - C N k: exact in curvature, biased by half a gap in slope."""
    A, B, C, N = 1.5, -2.0, 0.25, 4
    steps = [2, 6, 10, 14]
    state = _feed(Taylor(2), steps, [torch.tensor([[A + B * s + C * s * s]]) for s in steps])
    a = steps[-1]
    for k in (1, 2, 3):
        true = A + B * (a + k) + C * (a + k) ** 2
        got = float(Taylor(2).predict(state, a + k, 50, torch.zeros(1, 1)))
        assert got == pytest.approx(true - C * N * k)
        # and order 2 beats order 1 on a quadratic
        got1 = float(Taylor(1).predict(_feed(Taylor(1), steps, [torch.tensor([[A + B * s + C * s * s]])
                                                                for s in steps]), a + k, 50, torch.zeros(1, 1)))
        assert abs(got - true) < abs(got1 - true)


def _linear_module_along_direction(order):
    """O = W I + c with I(i) = I0 + t(i) u, t irregular and increasing: Proposition 1's setting."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g)
    c = torch.randn(6, generator=g)
    I0, u = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    t = {i: 0.3 * i + 0.08 * i * i + (0.2 if i % 3 == 0 else 0.0) for i in range(30)}

    def inp(i):
        return I0 + t[i] * u

    def out(i):
        return inp(i) @ W.T + c

    steps = [0, 1, 5, 9]
    pred = Relational(order)
    state = _feed(pred, steps, [out(s) for s in steps], [inp(s) for s in steps])
    return pred, state, inp, out


@pytest.mark.parametrize("order", [1, 2])
def test_relational_exact_on_linear_module_where_taylor_is_not(order):
    pred, state, inp, out = _linear_module_along_direction(order)
    steps = [0, 1, 5, 9]
    taylor_state = _feed(Taylor(order), steps, [out(s) for s in steps])
    for i in (10, 11, 13):
        torch.testing.assert_close(pred.predict(state, i, 30, inp(i)), out(i), rtol=1e-4, atol=1e-4)
        taylor_err = (Taylor(order).predict(taylor_state, i, 30, inp(i)) - out(i)).abs().max()
        assert taylor_err > 1e-2


def test_relational_ratio_is_hand_computed():
    pred = Relational(1)
    state = pred.new_state()
    pred.update(state, 0, torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    pred.update(state, 2, torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 3.0]]))
    assert float(state.ratio) == pytest.approx(2.0 / 5.0)  # ||O(a)-O(b)|| / ||I(a)-I(b)||
    # magnitude s * ||I(i) - I(a)|| = 0.4 * 10 along d/||d|| = (0, 1)
    got = pred.predict(state, 3, 10, torch.tensor([[9.0, 12.0]]))
    torch.testing.assert_close(got, torch.tensor([[1.0, 3.0 + 4.0]]))


def test_relational_ratio_is_hand_computed_off_axis_from_a_nonzero_input():
    """I(b) = (1, 1), I(a) = (4, 5): the input change (3, 4) has L2 norm 5 (L1 7, and ||I(a)|| = sqrt 41);
    O(b) = (2, 0), O(a) = (8, 8): the output change (6, 8) has norm 10, so s = 2. At I(i) = (9, 17) the input moved by
    (5, 12), norm 13, so the forecast is O(a) + 2 * 13 * (0.6, 0.8) = (23.6, 28.8). An L1 norm, or ||I(a)|| for the
    input change, gives other numbers."""
    pred = Relational(1)
    state = pred.new_state()
    pred.update(state, 0, torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]))
    pred.update(state, 2, torch.tensor([[4.0, 5.0]]), torch.tensor([[8.0, 8.0]]))
    assert float(state.ratio) == pytest.approx(2.0)
    got = pred.predict(state, 3, 10, torch.tensor([[9.0, 17.0]]))
    torch.testing.assert_close(got, torch.tensor([[23.6, 28.8]]))


@pytest.mark.parametrize("predictor", [Taylor(1), Taylor(2), Taylor(3), Relational(1), Relational(2), Relational(3),
                                       Linear(0.5)], ids=lambda p: f"{type(p).__name__}{p.order}")
def test_predictions_leave_the_cache_intact_and_support_autograd(predictor):
    # the predictors write over their fresh Taylor direction (at order 1: D_1 itself, never written into):
    # neither the stored state nor autograd may notice, whether the stored outputs carry gradients or not
    torch.manual_seed(0)
    for grad in (False, True):
        weight = torch.randn(4, 4, requires_grad=grad)
        state = predictor.new_state()
        for s in (1, 3, 6):
            x = torch.randn(2, 3, 4) * s
            predictor.update(state, s, x, x @ weight)
        stored = [d.detach().clone() for d in state.out.diffs]
        inp = torch.randn(2, 3, 4)
        with torch.no_grad():
            first = predictor.predict(state, 8, 10, inp)
            second = predictor.predict(state, 8, 10, inp)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        assert all(torch.equal(a, b.detach()) for a, b in zip(stored, state.out.diffs, strict=True))
        if grad:
            with_grad = predictor.predict(state, 8, 10, inp)
            with_grad.sum().backward()
            assert weight.grad is not None and torch.isfinite(weight.grad).all()
            torch.testing.assert_close(with_grad.detach(), first)


@pytest.mark.parametrize("order", [1, 2])
def test_relational_gradient_through_the_input_alone(order):
    """Full steps recorded without autograd, then a cached step whose input needs a gradient (guidance applied on
    late steps only): the coefficient then needs one, so the prediction must not be written into a buffer."""
    pred = Relational(order)
    state = pred.new_state()
    torch.manual_seed(0)
    with torch.no_grad():
        for s in (0, 2, 4):
            x = torch.randn(2, 3, 4)
            pred.update(state, s, x, 2 * x + s)
    inp = torch.randn(2, 3, 4, requires_grad=True)
    with torch.no_grad():
        expected = pred.predict(state, 6, 10, inp)
    got = pred.predict(state, 6, 10, inp)
    got.sum().backward()
    assert inp.grad is not None and torch.isfinite(inp.grad).all() and inp.grad.abs().sum() > 0
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)


def test_relational_fallbacks_per_sample():
    pred = Relational(1)
    state = pred.new_state()
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    pred.update(state, 0, x0, torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    # before the second full step: reuse
    torch.testing.assert_close(pred.predict(state, 1, 10, x0 + 5), torch.zeros(2, 2))
    # sample 1's input did not move between full steps: ratio is inf, so it falls back to Taylor
    x1 = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    pred.update(state, 1, x1, torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    got = pred.predict(state, 3, 10, torch.tensor([[6.0, 8.0], [7.0, 7.0]]))
    # sample 0: s = 1/5, ||I(i)-I(a)|| = 5, direction (1,0) -> (1+1, 0); sample 1: Taylor 2 + 2*2 = 6
    torch.testing.assert_close(got, torch.tensor([[2.0, 0.0], [6.0, 0.0]]))


@needs_cxx
def test_relational_fallbacks_survive_compile():
    """inductor simplifies ``x * 0`` to ``0``: a fallback mask written so would be ``True`` everywhere once compiled,
    and a compiled forecast would return inf or NaN where the eager one falls back to Taylor."""
    pred = Relational(1)
    state = pred.new_state()
    pred.update(state, 0, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0],
                                                                                            [5.0, 5.0]]))
    # sample 1: its input did not move (s infinite); sample 2: its output did not move (s = 0 and u = 0: NaN)
    pred.update(state, 1, torch.tensor([[3.0, 4.0], [1.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0],
                                                                                            [5.0, 5.0]]))
    inp, row = torch.tensor([[6.0, 8.0], [7.0, 7.0], [2.0, 0.0]]), torch.tensor(step_row(2))
    # sample 0: s = 1/5, ||I(i) - I(a)|| = 5, direction (1, 0) -> (1 + 1, 0); sample 1: Taylor 2 + 2 * 2 = 6;
    # sample 2: Taylor 5 + 2 * 0 = 5
    want = torch.tensor([[2.0, 0.0], [6.0, 0.0], [5.0, 5.0]])
    torch.testing.assert_close(pred.forecast(state, inp, row), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: pred.forecast(state, x, r), fullgraph=True)
    torch.testing.assert_close(compiled(inp, row), want)
    torch._dynamo.reset()


def test_relational_samples_never_share_norms():
    """Each sample (and so each CFG half) predicts exactly as it would alone in a batch of one."""
    g = torch.Generator().manual_seed(1)
    ins = [torch.randn(2, 4, 3, generator=g) * torch.tensor([1.0, 100.0]).view(2, 1, 1) for _ in range(3)]
    outs = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    pred = Relational(2)
    both = _feed(pred, [0, 1, 3], outs, ins)
    probe = torch.randn(2, 4, 3, generator=g)
    joint = pred.predict(both, 5, 10, probe)
    for j in range(2):
        alone = _feed(pred, [0, 1, 3], [o[j : j + 1] for o in outs], [x[j : j + 1] for x in ins])
        torch.testing.assert_close(joint[j : j + 1], pred.predict(alone, 5, 10, probe[j : j + 1]))


def test_linear_weight_schedule():
    pred = Linear(0.5)
    state = _feed(pred, [0, 4], [torch.full((1, 2), 1.0), torch.full((1, 2), 3.0)])
    torch.testing.assert_close(pred.predict(state, 6, 50, torch.zeros(1, 2)), torch.full((1, 2), 4.0))
    rising = Linear("rising")
    assert rising.weight_at(0, 50) == 0.0 and rising.weight_at(49, 50) == 1.0
    assert rising.weight_at(25, 51) == pytest.approx(0.5)
    torch.testing.assert_close(rising.predict(state, 49, 50, torch.zeros(1, 2)), torch.full((1, 2), 5.0))


def test_linear_weight_callable_results_are_checked():
    """A callable weight's result is checked at every call, as a constant is at construction: a NaN would have
    turned every cached output into NaN, None raised a bare TypeError. A one-element tensor is read as a number."""
    for bad in (float("nan"), float("inf"), None, "0.5"):
        with pytest.raises(ConfigError, match=r"Linear's weight, called at step 3 of 10, must be a callable returning "
                                              r"a finite number, got "):
            Linear(lambda step, n, bad=bad: bad).weight_at(3, 10)
    assert Linear(lambda step, n: torch.tensor(0.25)).weight_at(1, None) == 0.25
    assert Linear(lambda step, n: np.array(0.5)).weight_at(1, None) == 0.5  # e.g. scipy's interp1d
    with pytest.raises(ConfigError, match="Linear's weight"):
        Linear(lambda step, n: np.array([0.5, 0.5])).weight_at(1, None)
    seen = []
    assert Linear(lambda step, n: seen.append((step, n)) or step / 8).weight_at(2, None) == 0.25
    assert seen == [(2, None)]  # no announced length: None, as documented


@pytest.mark.parametrize("bad", [-1, 5, 2.5, True])
def test_order_out_of_range_names_the_parameter(bad):
    for cls in (Taylor, Relational):
        with pytest.raises(ConfigError, match=r"order must be an integer in 0\.\.4"):
            cls(bad)
    with pytest.raises(ConfigError, match="order"):
        Relational(0)
    with pytest.raises(ConfigError, match="weight"):
        Linear("sometimes")
    # the bounds themselves are accepted, and order 0 is reuse: the latest full output, unchanged
    assert Taylor(0).order == 0 and Taylor(4).order == 4 and Relational(1).order == 1 and Relational(4).order == 4
    state = _feed(Taylor(0), [0, 3], [torch.full((1, 2), 1.0), torch.full((1, 2), 7.0)])
    assert state.out.order == 0 and torch.equal(Taylor(0).predict(state, 5, 10, torch.zeros(1, 2)),
                                                torch.full((1, 2), 7.0))


@pytest.mark.parametrize("newton", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_direction_norm_from_the_gram_equals_the_norm_of_the_direction(order, newton):
    """``‖u‖`` from the Gram of the differences (what a compiled RFE forecast reads) is the norm of ``direction``, per
    sample, at any step, for the Taylor and the Newton forms and uneven gaps."""
    from relcache.methods.plus import NewtonHistory

    gen = torch.Generator().manual_seed(order)
    hist = (NewtonHistory if newton else DiffHistory)(order, None)
    for j, gap in enumerate([None, 2.0, 3.0, 1.0, 4.0]):
        x = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
        hist.update(x, None if gap is None else torch.tensor(gap, dtype=torch.float64))
        gram = hist.gram(torch.float64)
        if j == 0:
            assert gram is None
            continue
        m = min(j, order)
        assert gram.shape == (3, m, m) and torch.equal(gram, gram.transpose(1, 2))
        for k in (1, 2, 5):
            row = torch.tensor(step_row(k), dtype=torch.float64)
            want = torch.linalg.vector_norm(hist.direction(row, torch.float64).reshape(3, -1), dim=1)
            torch.testing.assert_close(hist.direction_norm(gram, row), want, rtol=1e-12, atol=0)


def test_relational_records_a_gram_only_when_compiled():
    """Eager records keep no Gram (their forecasts take the norm of ``u``); a compiled record does, and its forecast
    equals the eager one."""
    pred = Relational(2)
    eager = pred.new_state()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 6, generator=gen) for _ in range(4)]
    for i, x in enumerate(xs[:3]):
        pred.update(eager, 2 * i, x, 3 * x + x**2)
    assert eager.gram is None

    def record_then_forecast(state, inp, out, gap, new_in, row):
        pred.record(state, inp, out, gap)
        return pred.forecast(state, new_in, row), state.gram

    compiled = pred.new_state()
    for i, x in enumerate(xs[:2]):
        pred.update(compiled, 2 * i, x, 3 * x + x**2)
    fn = torch.compile(record_then_forecast, backend="aot_eager", fullgraph=True)
    row = torch.tensor(step_row(3))
    got, gram = fn(compiled, xs[2], 3 * xs[2] + xs[2] ** 2, torch.tensor(2.0), xs[3], row)
    assert gram is not None and gram.shape == (2, 2, 2)
    torch.testing.assert_close(got, pred.forecast(eager, xs[3], row), rtol=1e-5, atol=1e-6)


# Four samples of two values, full steps 0, 2, 4 (gaps 2). At step 4 samples 0-2 have an input that did not move
# (|I(4) - I(2)| = 0): sample 0 moves at the forecast (s = inf, coef inf), sample 1 does not (s = inf, moved 0:
# coef NaN), sample 2's output did not move either (s = 0/0 = NaN). Sample 3 is an ordinary RFE sample.
_FB_OUTS = [torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
            torch.tensor([[2.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, 4.0]]),
            torch.tensor([[6.0, 0.0], [0.0, 6.0], [4.0, 0.0], [0.0, 6.0]])]
_FB_INS = [torch.zeros(4, 2), torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
           torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [3.0, 4.0]])]
_FB_PROBE = torch.tensor([[4.0, 5.0], [1.0, 1.0], [2.0, 2.0], [9.0, 12.0]])  # the input at step 6 (k = 2)
# Hand values at k = 2. D1(2) = ((1, 0), (0, 1), (2, 0), (0, 2)), D1(4) = ((2, 0), (0, 2), (0, 0), (0, 1)),
# D2(4) = (D1(4) - D1(2)) / 2 = ((.5, 0), (0, .5), (-1, 0), (0, -.5)).
# Order 1, Taylor O(4) + 2 D1(4): (10, 0), (0, 10), (4, 0). Order 2, O(4) + 2 (D1 + D2): (11, 0), (0, 11), (2, 0).
# Sample 3: s = |(0, 2)| / |(3, 4)| = 0.4, |I(6) - I(4)| = |(6, 8)| = 10, direction (0, 1): O(4) + (0, 4) = (0, 10)
# at either order (Taylor would give (0, 8) at order 1 and (0, 7) at order 2).
_FB_WANT = {1: torch.tensor([[10.0, 0.0], [0.0, 10.0], [4.0, 0.0], [0.0, 10.0]]),
            2: torch.tensor([[11.0, 0.0], [0.0, 11.0], [2.0, 0.0], [0.0, 10.0]])}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("host_k", [False, True], ids=["row_k", "host_k"])
@pytest.mark.parametrize("order", [1, 2])
def test_relational_zero_input_change_falls_back_to_taylor(order, host_k, grad):
    """den = |I(a) - I(b)| = 0 makes the ratio inf or NaN (not clamped to a finite number): the coefficient falls
    back to k, the Taylor forecast, whether k comes as a host number (``nan_to_num``) or from the row (``where``),
    per sample, leaving the ordinary sample's RFE forecast alone."""
    pred = Relational(order)
    state = pred.new_state()
    with torch.set_grad_enabled(grad):
        for s, x, o in zip([0, 2, 4], _FB_INS, _FB_OUTS, strict=True):
            pred.update(state, s, x, o.clone())
        assert torch.equal(state.ratio.isinf(), torch.tensor([True, True, False, False]))
        assert torch.equal(state.ratio.isnan(), torch.tensor([False, False, True, False]))
        if host_k:
            got = pred.predict(state, 6, 10, _FB_PROBE.clone())
        else:
            got = pred.forecast(state, _FB_PROBE.clone(), torch.tensor(step_row(2)))
    want = _FB_WANT[order]
    assert torch.equal(got[:3], want[:3]), got  # small integers and halves: exact
    torch.testing.assert_close(got[3:], want[3:], rtol=1e-6, atol=1e-6)


def test_rising_weight_hand_values():
    """0 at the first step, 1 at the last, linear between and clamped outside; 0.5 where the number of steps is
    unknown (None) or leaves no line (0 or 1 step)."""
    assert rising_weight(7, None) == 0.5 and rising_weight(0, None) == 0.5
    assert rising_weight(0, 1) == 0.5 and rising_weight(3, 0) == 0.5
    assert rising_weight(10, 41) == 0.25 and rising_weight(0, 41) == 0.0 and rising_weight(40, 41) == 1.0
    assert rising_weight(-3, 41) == 0.0 and rising_weight(60, 41) == 1.0
    # Linear("rising") without a step count: O(a) + 0.5 (O(a) - O(b)) = 3 + 0.5 * 2
    pred = Linear("rising")
    state = _feed(pred, [0, 4], [torch.full((1, 2), 1.0), torch.full((1, 2), 3.0)])
    assert pred.weight_at(6, None) == 0.5
    assert torch.equal(pred.predict(state, 6, None, torch.zeros(1, 2)), torch.full((1, 2), 4.0))


def test_relational_without_a_ratio_forecasts_taylor():
    """docs/spec.md: where s could not be formed (the input's shape changed between the two full steps) the forecast
    is Taylor's. O(0) = (1, 1), O(2) = (3, 5): D1 = (1, 2); at k = 1, (3, 5) + (1, 2) = (4, 7) (reuse would give
    (3, 5))."""
    pred = Relational(1)
    state = pred.new_state()
    pred.update(state, 0, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]))
    pred.update(state, 2, torch.ones(1, 3), torch.tensor([[3.0, 5.0]]))  # the input's shape changed
    assert state.ratio is None and state.out.order == 1
    assert torch.equal(pred.predict(state, 3, 10, torch.full((1, 3), 2.0)), torch.tensor([[4.0, 7.0]]))
    assert torch.equal(pred.forecast(state, torch.full((1, 3), 2.0), torch.tensor(step_row(1))),
                       torch.tensor([[4.0, 7.0]]))

