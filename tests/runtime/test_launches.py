"""Kernel launches of an eager cached step (counts, not timings): what a launch-bound GPU pays per step.

Each operator that is not a view is one launch on a GPU, the same count on every device (docs/performance.md).
"""

import pytest
import torch
from conftest import tiny_dit
from torch.utils._python_dispatch import TorchDispatchMode

import relcache
from relcache.methods.config import CacheConfig
from relcache.methods.fit import InputFit
from relcache.methods.predictors import Forecast, Relational, Reuse, Taylor
from relcache.methods.schedules import Interval


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def _cached_step_launches(config: CacheConfig) -> int:
    """Operators of step 4 of a generation whose first 4 steps are full and the rest cached (tiny DiT, 3 blocks)."""
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    relcache.enable(model, config)
    relcache.begin_generation(model, num_steps=5)
    count = _Count()
    try:
        with torch.no_grad():
            for i in range(5):
                t = torch.full((2,), 999 - 20 * i)
                if i == 4:
                    with count:
                        model(x + 0.01 * i, timestep=t, class_labels=labels)
                else:
                    model(x + 0.01 * i, timestep=t, class_labels=labels)
        assert relcache.stats(model).full_steps == [0, 1, 2, 3]
    finally:
        relcache.disable(model)
    return count.n


def test_eager_rfe_cached_step_launches_fora_plus_eight_per_module():
    # order 2: the input change, its norm, the direction, its norm, s * moved, / |u|, the fallback (one
    # nan_to_num with the step's k on the host) and the forecast; Taylor's 2 are the direction and the forecast
    fora = _cached_step_launches(CacheConfig(Reuse(), Interval(1000, 4)))
    taylor = _cached_step_launches(CacheConfig(Taylor(2), Interval(1000, 4)))
    rfe = _cached_step_launches(CacheConfig(Relational(2), Interval(1000, 4)))
    modules = 6  # attention and feed-forward of 3 blocks
    assert taylor - fora == 2 * modules
    assert rfe - fora == 8 * modules


def test_eager_input_fit_cached_step_launches_rfe_plus_three_per_module():
    # the input's move, its dot products with the stored moves (one batched product), the solve (a small product),
    # the increment's length over s from the output Gram over s² (two small products and a root), the move's norm,
    # their quotient, its fallback and the scaled weights; the forecast itself is one batched multiply-add
    fora = _cached_step_launches(CacheConfig(Reuse(), Interval(1000, 4)))
    fit = _cached_step_launches(CacheConfig(InputFit(2, scale=True), Interval(1000, 4)))
    rfe = _cached_step_launches(CacheConfig(Relational(2), Interval(1000, 4)))
    modules = 6
    assert fit - fora == 11 * modules and fit - rfe == 3 * modules


def test_eager_rcs_check_launches_seven_kernels_per_step():
    # the probe's direction and forecast, the error in place, its L1 norm and the probe's, the clamp and the division;
    # the mean over the finite samples is taken on the host from the per-sample errors (one transfer, no kernel)
    rfe = _cached_step_launches(CacheConfig(Relational(2), Interval(1000, 4)))
    rfc = _cached_step_launches(relcache.RFC(threshold=1e30, warmup=4))
    assert rfc - rfe == 7


def _state(pred: Relational, outs: list[torch.Tensor], ins: list[torch.Tensor]):
    state = pred.new_state()
    for t, (x, y) in enumerate(zip(ins, outs, strict=True)):
        pred.update(state, 2 * t, x, y)
    return state


@pytest.mark.parametrize("case", ["finite", "input did not move", "output did not move", "nan input"])
def test_host_k_gives_the_same_forecast_with_two_operators_fewer(case):
    g = torch.Generator().manual_seed(1)
    ins = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    outs = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    new = ins[-1] + 0.3
    if case == "input did not move":  # s = inf for sample 0: the Taylor forecast there
        ins[2][0] = ins[1][0]
    elif case == "output did not move":  # u = 0 for sample 1 (every difference zero): coef = 0/0
        for o in outs:
            o[1] = outs[0][1]
    elif case == "nan input":
        new[0, 0, 0] = float("nan")
    pred = Relational(2)
    k = 3.0
    row = torch.tensor([k / 1, k / 2, k / 3, k / 4, 0.0])
    got = {}
    for host in (None, k):
        state = _state(pred, outs, ins)
        count = _Count()
        with torch.no_grad(), count:
            got[host] = (pred.forecast(state, new.clone(), row, host), count.n)
    (device_out, device_n), (host_out, host_n) = got[None], got[k]
    torch.testing.assert_close(host_out, device_out, rtol=0, atol=0, equal_nan=True)
    assert host_n == device_n - 2
    if case == "input did not move":  # the Taylor forecast O(a) + k (D_1 + k/2 D_2) for that sample
        st = _state(pred, outs, ins)
        d = [st.out.get(j, torch.float32) for j in range(3)]
        taylor = d[0] + k * (d[1] + k / 2 * d[2])
        torch.testing.assert_close(host_out[0], taylor[0])


class _Identity:
    """A reducer over one process: sums are the partial sums (the split-sequence code path, nothing split)."""

    def sum(self, partials):
        return partials

    def later(self, partials, done):
        done(partials)


@pytest.mark.parametrize("reducer", [None, _Identity()], ids=["local", "split sequence"])
def test_forecast_many_gives_each_item_its_own_k(reducer):
    # sample 0's input did not move between the two latest full steps: s = inf there, so its forecast is the Taylor
    # fallback O(a) + k u with the item's own k (2 and 5 here); a k routed to the wrong item would show
    g = torch.Generator().manual_seed(2)
    ins = [torch.randn(2, 3, generator=g) for _ in range(3)]
    outs = [torch.randn(2, 3, generator=g) for _ in range(3)]
    ins[2][0] = ins[1][0]
    pred = Relational(1)
    state = pred.new_state(reducer=reducer)
    for t, (x, y) in enumerate(zip(ins, outs, strict=True)):
        pred.update(state, 2 * t, x, y)
    new = ins[-1] + 0.5
    rows = {k: torch.tensor([k, k / 2, k / 3, k / 4, 0.0]) for k in (2.0, 5.0)}
    device = pred.forecast_many([(state, new, rows[2.0]), (state, new, rows[5.0])])  # plain tuples: k from the rows
    host = pred.forecast_many([Forecast(state, new, rows[2.0], 2.0), Forecast(state, new, rows[5.0], 5.0)])
    d1 = state.out.get(1, torch.float32)
    for k, a, b in zip((2.0, 5.0), device, host, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(b[0], outs[-1][0] + k * d1[0])


def test_a_predictor_written_without_k_still_works():
    class Old(Reuse):  # forecast(state, inp, row), as before k existed
        def forecast(self, state, inp, row):
            return super().forecast(state, inp, row) + 1

    pred = Old()
    state = pred.new_state()
    x = torch.ones(2, 3)
    pred.update(state, 0, x, x)
    row = torch.tensor([1.0, 0.5, 1 / 3, 0.25, 0.0])
    assert torch.equal(pred.predict(state, 1, 10, x), x + 1)
    assert torch.equal(pred.forecast_many([Forecast(state, x, row, 1.0)])[0], x + 1)
