"""Divided differences and per-sample norms (relcache.methods.history) against hand-computed values."""

import pytest
import torch

from relcache import Relational
from relcache.methods.history import DiffHistory, sample_relative_l1, step_row

# X(0), X(2), X(6): gaps 2 and 4, two samples of two values (every number below is exact in float32)
_STEPS = [0, 2, 6]
_VALUES = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 2.0], [3.0, 12.0]]),
           torch.tensor([[13.0, 2.0], [-1.0, 12.0]])]
# D1(2) = (X(2) - X(0)) / 2, D1(6) = (X(6) - X(2)) / 4, D2(6) = (D1(6) - D1(2)) / 4
_D1_AT_2 = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
_D1_AT_6 = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
_D2_AT_6 = torch.tensor([[0.0, 0.0], [-0.25, -1.0]])


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("with_change", [False, True])
def test_diff_history_update_stores_hand_computed_differences(order, with_change):
    """``update`` with the caller's ``change = value - D_0`` (RFE's no-grad record path: D_1 divided into it in place)
    stores the same differences as without it, exactly: D_1 = change / N, and D_2 from that D_1 and the gap."""
    h = DiffHistory(order)
    for j, (s, x) in enumerate(zip(_STEPS, _VALUES, strict=True)):
        gap = None if j == 0 else torch.tensor(float(s - _STEPS[j - 1]))
        change = x - h.base(x.dtype) if with_change and j else None
        h.update(x.clone(), gap, change)
        if j == 1:
            assert h.order == 1 and torch.equal(h.diffs[0], _VALUES[1]) and torch.equal(h.diffs[1], _D1_AT_2)
            assert float(h.gap) == 2.0
    want = [_VALUES[2], _D1_AT_6, _D2_AT_6][: order + 1]
    assert h.order == order and float(h.gap) == 4.0
    assert all(torch.equal(got, w) for got, w in zip(h.diffs, want, strict=True)), h.diffs


@pytest.mark.parametrize("order", [1, 2])
def test_relational_no_grad_record_stores_hand_computed_differences(order):
    """RFE records under no_grad (how the runtime runs) hand its output change to the history, which divides D_1
    into it in place: the stored D_1 (and D_2) and the ratio must be the hand-computed ones."""
    pred = Relational(order)
    state = pred.new_state()
    # inputs move by (3, 4) per sample between the last two records: |I(6) - I(2)| = 5
    ins = [torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[4.0, 5.0], [3.0, 4.0]])]
    with torch.no_grad():
        for s, x, o in zip(_STEPS, ins, _VALUES, strict=True):
            pred.update(state, s, x, o.clone())
    want = [_VALUES[2], _D1_AT_6, _D2_AT_6][: order + 1]
    assert all(torch.equal(got, w) for got, w in zip(state.out.diffs, want, strict=True)), state.out.diffs
    # ratio |O(6) - O(2)| / |I(6) - I(2)|: sample 0 |(8, 0)| / 5, sample 1 |(-4, 0)| / 5
    torch.testing.assert_close(state.ratio, torch.tensor([8.0 / 5.0, 4.0 / 5.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sample_relative_l1_zero_reference_guard_is_per_sample(dtype):
    """A sample whose reference is all zero divides by the smallest normal float32 (2**-126), never by 0: its error
    is |error|_1 * 2**126 (0 for a zero error, not NaN); the other samples keep their own ratio."""
    error = torch.tensor([[0.5, -0.5], [0.0, 0.0], [1.0, -2.0]], dtype=dtype)
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, -2.0]], dtype=dtype)
    got = sample_relative_l1(error, ref)
    want = torch.tensor([2.0**126, 0.0, 0.5], dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, want), got


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten overloads a block of code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("order", "want"), [
    (1, [[17.0, 2.0], [-3.0, 12.0]]),  # X(6) + 2 D1
    (2, [[17.0, 2.0], [-3.5, 10.0]]),  # X(6) + 2 D1 + 2²/2 D2
])
def test_taylor_forecast_is_hand_computed_and_leaves_the_differences_alone(order, want):
    """Eager, without autograd, Taylor's sum is written over its own direction (one fresh tensor per forecast): the
    forecast two steps on is the hand-computed one, twice in a row, and no stored difference changed (at order 1 the
    direction is the stored D_1, so the sum must not go there)."""
    h = DiffHistory(order)
    for j, (s, x) in enumerate(zip(_STEPS, _VALUES, strict=True)):
        h.update(x.clone(), None if j == 0 else torch.tensor(float(s - _STEPS[j - 1])))
    stored = [(d, d.clone(), d._version) for d in h.diffs]
    row = torch.tensor(step_row(2))
    with torch.no_grad():
        first, second = h.taylor(row, torch.float32), h.taylor(row, torch.float32)
    assert torch.equal(first, torch.tensor(want)) and torch.equal(second, torch.tensor(want)), (first, second)
    assert not any(first is d for d in h.diffs)
    assert all(now is d and torch.equal(d, copy) and d._version == v
               for now, (d, copy, v) in zip(h.diffs, stored, strict=True))


@pytest.mark.parametrize("order", [2, 3, 4])
def test_taylor_forecast_in_place_only_where_eager_without_autograd(order):
    """From order 2 the no-grad forecast runs every product after the first into that first fresh tensor
    (``addcmul.out``) and gives the out-of-place form's numbers bit for bit; with autograd on, all out of place."""
    g = torch.Generator().manual_seed(order)
    h = DiffHistory(order)
    for j in range(order + 1):
        h.update(torch.randn(3, 5, 7, generator=g), None if j == 0 else torch.tensor(float(j + 1)))
    row = torch.tensor(step_row(3))
    with torch.enable_grad(), _Ops() as grad_ops:
        reference = h.taylor(row, torch.float32)
    with torch.no_grad(), _Ops() as ops:
        got = h.taylor(row, torch.float32)
    assert torch.equal(got, reference)
    assert [n for n in grad_ops.names if n.startswith("aten.addcmul")] == ["aten.addcmul.default"] * order
    assert [n for n in ops.names if n.startswith("aten.addcmul")] == ["aten.addcmul.default"] + ["aten.addcmul.out"] * (
        order - 1)


def test_static_buffers_of_another_storage_are_dropped_with_the_base():
    """A budget may choose another storage for the same shapes in a later generation: the buffers held for the old
    one go, the base (order 0) too (found by review: the float base stayed beside the int8 one, compiled runs then
    held more than ``max_cache_bytes``). Only the new storage's keys remain, of the new storage's sizes."""
    from relcache.methods.history import DiffHistory, StaticCaches
    from relcache.methods.storage import CacheStorage

    static, gap = StaticCaches(), torch.ones(())
    value = torch.randn(2, 8, 16)
    for storage in (None, CacheStorage("int8", "int8", "int8"), None):
        hist = DiffHistory(2, storage)
        for step in range(3):
            hist.update(value + step, None if step == 0 else gap)
            static.hold_history("m", hist, value, gap)
        scaled = storage is not None
        for j in range(3):
            assert (("m", j) in static.buffers) is not scaled, (storage, j)
            assert ((("m", j), "data") in static.buffers) is scaled, (storage, j)
        held = [k for k in static.buffers if k != ("m", "gap")]
        assert len(held) == (6 if scaled else 3), held


def test_taylor_order_4_forecast_is_hand_computed():
    """X(t) = t^4 at full steps 0..4 (gap 1). Backward differences at a = 4: D0 = 256, D1 = 256 - 81 = 175,
    D2 = 175 - 65 = 110, D3 = 110 - 50 = 60, D4 = 60 - 36 = 24 (= 4!). Forecast at k = 2:
    256 + 175·2 + 110·2²/2 + 60·2³/6 + 24·2⁴/24 = 256 + 350 + 220 + 80 + 16 = 922."""
    h = DiffHistory(4)
    for t in range(5):
        h.update(torch.tensor([[float(t) ** 4]], dtype=torch.float64),
                 None if t == 0 else torch.tensor(1.0, dtype=torch.float64))
    assert [d.item() for d in h.diffs] == [256.0, 175.0, 110.0, 60.0, 24.0]
    row = torch.tensor(step_row(2), dtype=torch.float64)
    assert h.taylor(row, torch.float64).item() == pytest.approx(922.0, abs=1e-9)
    # and through the predictor, by step number
    from relcache import Taylor

    pred = Taylor(4)
    state = pred.new_state()
    for t in range(5):
        x = torch.tensor([[float(t) ** 4]], dtype=torch.float64)
        pred.update(state, t, x, x)
    assert pred.predict(state, 6, 10, torch.zeros(1, 1, dtype=torch.float64)).item() == pytest.approx(922.0, abs=1e-9)
