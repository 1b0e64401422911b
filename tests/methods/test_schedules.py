"""Schedules against hand-counted full steps and hand-computed accumulated errors."""

import warnings
from dataclasses import dataclass

import pytest
import torch

from relcache import RFC, ConfigError, InputError, Interval
from relcache.methods.schedules import GAP_CAP


@pytest.mark.parametrize("interval,nfc", [(4, 14), (5, 11), (6, 10), (7, 8), (9, 7)])
def test_interval_nfc_matches_the_papers_table(interval, nfc):
    steps = Interval(interval, 2).full_steps(50)
    assert len(steps) == nfc
    assert steps[:3] == [0, 1, 1 + interval]
    assert all(b - a == interval for a, b in zip(steps[1:], steps[2:], strict=False))


def test_a_warmup_covering_the_whole_generation_warns():
    """FasterCache's warmup=15 (diffusers' schedule at 50 steps) on a 12-step generation computes every step: a
    warning says so, once the step count is known; a warm-up that leaves a step to cache, or interval 1, does not."""
    with pytest.warns(RuntimeWarning, match=r"warm-up \(warmup=15\) covers all 12 steps"):
        Interval(2, warmup=15).new_state(12)
    assert Interval(2, warmup=15).full_steps(12) == list(range(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Interval(2, warmup=15).new_state(16)
        Interval(2, warmup=15).new_state(None)
        Interval(1, warmup=15).new_state(12)
    # RCS with a threshold too (its warm-up steps are full whatever the error); target_nfc at the step count
    # asks for every step full by its number, and a budget past it is refused already
    with pytest.warns(RuntimeWarning, match=r"warm-up \(warmup=2\) covers all 2 steps"):
        InputError(threshold=0.1).new_state(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InputError(threshold=0.1).new_state(3)
        InputError(threshold=0.1).new_state(None)
        InputError(target_nfc=2).new_state(2)


def test_interval_hand_counted():
    assert Interval(3, 1).full_steps(10) == [0, 3, 6, 9]
    assert Interval(4, 3).full_steps(12) == [0, 1, 2, 6, 10]
    assert Interval(1, 2).full_steps(5) == [0, 1, 2, 3, 4]


def test_interval_phases_hand_counted():
    # spec: warm-up 0, 1, then 1 + 4j; diffusers: warm-up 0, 1, then (i - 3) % 4 == 0: 3, 7, ...
    assert Interval(4, 2, phase="spec").full_steps(12) == [0, 1, 5, 9] == Interval(4, 2).full_steps(12)
    assert Interval(4, 2, phase="diffusers").full_steps(12) == [0, 1, 3, 7, 11]
    # diffusers' phase at N = 9 over 50 steps spends one more full step and forecasts the last step
    assert Interval(9, 2, phase="diffusers").full_steps(50) == [0, 1, 3, 12, 21, 30, 39, 48]
    assert Interval(9, 2).full_steps(50) == [0, 1, 10, 19, 28, 37, 46]
    assert Interval(3, 1, phase="diffusers").full_steps(10) == [0, 2, 5, 8]
    assert Interval(1, 2, phase="diffusers").full_steps(5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("phase", ["Spec", "paper", None, 1])
def test_interval_phase_names_the_parameter_and_allowed_values(phase):
    with pytest.raises(ConfigError, match=r"phase must be one of 'spec', 'diffusers', got " + repr(phase)):
        Interval(4, 2, phase=phase)


def _run(schedule, probes):
    state = schedule.new_state(len(probes))
    return [i for i, p in enumerate(probes) if schedule.decide(state, i, p)], state


def test_rcs_fires_where_the_hand_computed_accumulated_error_crosses_tau():
    # order 0: the input forecast is the last full step's input, so e(i) = c_i / (1 + c_i) on a ones tensor
    c = [0.0, 0.1, 0.1, 0.3, 0.35, 0.4, 0.9]
    base = torch.ones(2, 4, 3)
    probes = [base * (1 + ci) for ci in c]
    # step 1: e = .1/1.1 = .0909; step 2: E = .1818; step 3: + .3/1.3 = .4126 > .3 -> full, reference 1.3
    # step 4: |1.35-1.3|/1.35 = .0370; step 5: + .1/1.4 = .1085; step 6: + .6/1.9 = .4243 > .3 -> full
    full, state = _run(InputError(threshold=0.3, order=0, warmup=1), probes)
    assert full == [0, 3, 6]
    assert state.errors[3] == pytest.approx(0.3 / 1.3, rel=1e-5)
    assert state.errors[5] == pytest.approx(0.1 / 1.4, rel=1e-5)
    # tau just above E(3) = .4126: step 4 adds .35/1.35 = .2593 -> E = .6719 > tau; then from reference 1.35
    # step 5: .05/1.4 = .0357, step 6: + .55/1.9 = .2895 -> E = .3252 < tau: no further full step
    full_hi, _ = _run(InputError(threshold=0.4127, order=0, warmup=1), probes)
    assert full_hi == [0, 4]


def test_rcs_error_is_the_batch_mean_of_per_sample_errors():
    probes = [torch.ones(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])]
    schedule = InputError(threshold=10.0, order=0, warmup=1)
    state = schedule.new_state(2)
    schedule.decide(state, 0, probes[0])
    schedule.decide(state, 1, probes[1])
    assert state.errors[1] == pytest.approx((0.0 + 0.5) / 2)


def test_rcs_never_fires_on_exactly_predictable_inputs_but_max_skip_bounds():
    probes = [torch.full((1, 4), 1.0 + 0.5 * i) for i in range(12)]  # linear in i: order-1 forecast exact
    full, _ = _run(InputError(threshold=1e-6, order=1, warmup=2), probes)
    assert full == [0, 1]
    full, _ = _run(InputError(threshold=1e-6, order=1, warmup=2, max_skip=3), probes)
    assert full == [0, 1, 5, 9]


def test_rcs_probe_of_another_shape_is_a_full_step():
    """A batch or resolution change within a generation leaves nothing to forecast the probe from."""
    probes = [torch.full((2, 4), 1.0 + 0.5 * i) for i in range(4)] + [torch.full((1, 4), 3.0 + 0.5 * i)
                                                                        for i in range(3)]
    full, state = _run(InputError(threshold=1e-6, order=1, warmup=2), probes)
    # exact order-1 forecasts, except at the change (history starts over) and the step after it (order 0 only)
    assert full == [0, 1, 4, 5]
    assert state.history.diffs[0].shape == (1, 4) and state.last_full == 5


@pytest.mark.parametrize("target", [7, 8, 10, 11, 14])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_nfc_is_met(target, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, generator=g)
    probes = []
    for i in range(50):  # a drifting input with phases of fast and slow change
        speed = 0.05 + (0.5 if i < 8 or i > 42 else 0.0)
        x = x + speed * torch.randn(2, 16, generator=g) + 0.01 * i
        probes.append(x.clone())
    full, _ = _run(InputError(target_nfc=target), probes)
    # exact: no full step once the budget is spent, and every step full once the steps left equal the budget left,
    # so the count cannot end above or below target_nfc (no max_skip here; the inputs stay finite and one shape)
    assert len(full) == target
    assert full[:2] == [0, 1]


def test_target_nfc_gap_cap_on_exactly_predictable_inputs():
    # Linear inputs: the forecast is exact after warm-up, so E stays 0 and tau is calibrated to 0; only the
    # gap cap (1.5 even gaps, the even gap being (T - last_full - 1) / budget left) and the hard rules fire.
    probes = [torch.full((1, 4), 1.0 + 0.5 * i) for i in range(50)]
    full, state = _run(InputError(target_nfc=7), probes)
    # 0, 1 warm-up; even gap 48/5 = 9.6 -> first full at k = 10 (step 11), tau = 0;
    # 38/4 = 9.5 -> cap 14.25 -> k = 15 (26); 23/3 -> cap 11.5 -> k = 12 (38); 11/2 -> cap 8.25 -> k = 9 (47);
    # then 2/1 -> cap 3 is past the end, and the last step is full once the steps left equal the budget left.
    assert full == [0, 1, 11, 26, 38, 47, 49]
    assert state.tau == 0.0


def test_target_nfc_with_max_skip_still_capped():
    probes = [torch.full((1, 4), 1.0 + 0.5 * i) for i in range(50)]
    with pytest.warns(RuntimeWarning, match="target_nfc=7 cannot keep max_skip=2 over 50 steps"):
        full, _ = _run(InputError(target_nfc=7, max_skip=2), probes)
    assert len(full) == 7


def _longest_cached_run(full: list[int], steps: int) -> int:
    return max(b - a - 1 for a, b in zip([-1, *full], [*full, steps], strict=True))


def test_a_budget_that_cannot_keep_max_skip_warns_and_one_that_warns_breaks_it():
    """Found by review: RFC(target_nfc=5, max_skip=2) over 20 steps cached 9 steps in a row at the end without a word
    (the budget comes first, as the spec chooses). Keeping max_skip needs warmup + (T - warmup) // (max_skip + 1)
    full steps (hand count here: 2 + 18 // 3 = 8); fewer warns at the plan, and every plan that warns does break
    max_skip (swept over small generations)."""
    probes = [torch.full((1, 4), 1.0 + 0.5 * i) for i in range(20)]
    with pytest.warns(RuntimeWarning, match=r"target_nfc=5 cannot keep max_skip=2 over 20 steps \(keeping it needs "
                                            r"at least 8 full steps with warmup=2\)"):
        full, _ = _run(InputError(target_nfc=5, max_skip=2), probes)
    assert len(full) == 5 and _longest_cached_run(full, 20) > 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full, _ = _run(InputError(target_nfc=8, max_skip=2), probes)
    assert len(full) == 8 and _longest_cached_run(full, 20) <= 2
    for steps in range(3, 16):
        for warmup in (1, 2):
            for max_skip in (1, 2, 3):
                for nfc in range(warmup, steps + 1):
                    with warnings.catch_warnings(record=True) as got:
                        warnings.simplefilter("always")
                        full, _ = _run(InputError(target_nfc=nfc, max_skip=max_skip, warmup=warmup), probes[:steps])
                    if any("cannot keep" in str(w.message) for w in got):
                        assert _longest_cached_run(full, steps) > max_skip, (steps, warmup, max_skip, nfc)


def test_schedule_bad_input_names_parameter_and_allowed_values():
    with pytest.raises(ConfigError, match="exactly one of threshold and target_nfc"):
        RFC()
    with pytest.raises(ConfigError, match="exactly one of threshold and target_nfc"):
        RFC(threshold=0.1, target_nfc=10)
    with pytest.raises(ConfigError, match=r"threshold must be a finite number >= 0"):
        RFC(threshold=-0.1)
    with pytest.raises(ConfigError, match=r"interval must be an integer >= 1"):
        Interval(0)
    with pytest.raises(ConfigError, match=r"warmup must be an integer >= 1"):
        Interval(4, 0)
    with pytest.raises(ConfigError, match=r"max_skip must be an integer >= 1"):
        RFC(threshold=0.1, max_skip=0)
    with pytest.raises(ConfigError, match=r"target_nfc must be <= the number of steps \(50\)"):
        InputError(target_nfc=51).new_state(50)
    with pytest.raises(ConfigError, match=r"target_nfc must be >= warmup"):
        RFC(target_nfc=1)
    with pytest.raises(ConfigError, match="begin_generation"):
        InputError(target_nfc=10).new_state(None)


@dataclass(frozen=True)
class _ScriptedErrors(InputError):
    """RCS with the input errors ``e(i)`` given per step (the decision rules alone, without a forecast)."""

    errs: tuple[float, ...] = ()

    def input_error(self, state, step, probe, measured=None):
        return self.errs[step]


def test_target_nfc_does_not_spend_its_budget_before_the_end():
    """tau's rescaling compounds: after long early gaps (large early errors) it shrank below one step's error, so
    every step was full until the budget was gone and the last steps were all forecast (found by review: on the
    reference model, K = 20 of 50 spent its budget by step 43, with 4x K = 18's error; here K = 22 by step 44,
    full at every step from 33 to 42). No gap is now shorter than 1 / GAP_CAP even gaps either."""
    errs = tuple(0.06 if i < 4 else 0.007 for i in range(50))
    schedule = _ScriptedErrors(target_nfc=22, errs=errs)
    full, _ = _run(schedule, [torch.zeros(1, 4)] * 50)
    # from step 33 (12 used, 10 left): even gap (49 - 33) / 10 = 1.6, so no gap below 1.07: 35; then 14 / 9 -> 37;
    # 12 / 8 = 1.5 -> gap 1 allowed: 38; 11 / 7 -> 40; 9 / 6 -> 41; 8 / 5 -> 43; 6 / 4 -> 44; 5 / 3 -> 46; 3 / 2 ->
    # 47; 2 / 1 -> 49 (also the last step, full once the steps left equal the budget left)
    assert full == [0, 1, 4, 8, 12, 16, 20, 23, 26, 29, 31, 33, 35, 37, 38, 40, 41, 43, 44, 46, 47, 49]
    used = 2
    for a, b in zip(full[2:], full[3:], strict=False):  # every gap after the first past warm-up
        used += 1
        need = (50 - a - 1) / (22 - used)
        assert b - a >= need / GAP_CAP - 1e-9, (a, b, need)


def test_rcs_fires_only_when_the_error_exceeds_tau_strictly():
    """Order 0, probes 1, 2, 4 (times ones): e(1) = |2 - 1| / 2 = 0.5 = tau exactly -> not full (E > tau is strict);
    e(2) = |4 - 1| / 4 = 0.75 -> E = 1.25 > 0.5 -> full. With E >= tau step 1 would be full too."""
    probes = [torch.full((1, 4), v) for v in (1.0, 2.0, 4.0)]
    assert _run(InputError(threshold=0.5, order=0, warmup=1), probes)[0] == [0, 2]
    # threshold 0 on exactly predictable inputs (E stays 0): never full after warm-up
    linear = [torch.full((1, 4), 1.0 + 0.5 * i) for i in range(8)]
    assert _run(InputError(threshold=0.0, order=1, warmup=2), linear)[0] == [0, 1]


def test_target_nfc_gap_cap_reached_exactly_is_full():
    """10 linear probes (E = 0, so tau = 0 and only the cap and the hard rules fire), target 6. After 0, 1: even gap
    (10 - 1 - 1) / 4 = 2 -> full at k = 2 (step 3), tau = 0. Then (10 - 3 - 1) / 3 = 2, cap 1.5 · 2 = 3 reached at
    k = 3 exactly: step 6 full (a gap of 4 would pass the cap). Then 2 full steps left for steps 8, 9: both full
    once the steps left equal the budget left."""
    probes = [torch.full((1, 4), 1.0 + 0.5 * i) for i in range(10)]
    assert _run(InputError(target_nfc=6), probes)[0] == [0, 1, 3, 6, 8, 9]


def test_rcs_error_is_the_mean_of_the_finite_samples_and_all_nan_is_full():
    """Sample 1 NaN at step 1: e(1) is sample 0's error alone, |2 - 1| / 2 = 0.5 (not (0.5 + 0) / 2 or / 2 samples),
    and nonfinite counts 1. Every sample NaN at step 2: nothing to judge by, so full even under threshold 10;
    with target_nfc only while the budget lasts."""
    from relcache.methods.schedules import finite_mean

    assert finite_mean([0.5, float("nan"), 0.25]) == (0.375, 1)
    got = finite_mean([float("nan"), float("-inf")])
    assert got[1] == 2 and got[0] != got[0]
    assert finite_mean([0.5, float("nan"), float("inf")]) == (float("inf"), 2)
    sched = InputError(threshold=10.0, order=0, warmup=1)
    state = sched.new_state(3)
    one = torch.tensor([[2.0, 2.0], [float("nan"), float("nan")]])
    full = [sched.decide(state, 0, torch.ones(2, 2)), sched.decide(state, 1, one),
            sched.decide(state, 2, torch.full((2, 2), float("nan")))]
    assert full == [True, False, True]
    assert state.errors[1] == 0.5 and state.nonfinite == {1: 1, 2: 2}
    budget = InputError(target_nfc=2, order=0, warmup=1)
    nan = torch.full((1, 2), float("nan"))
    assert _run(budget, [torch.ones(1, 2), nan, nan, nan])[0] == [0, 1]


def test_gap_floor_none_removes_the_lower_bound(monkeypatch):
    """``GAP_FLOOR = None`` (what ``benchmarks/gap_floor.py`` measures against) brings back the schedule the bound
    fixed: the scripted errors of the test above spend K = 22 on consecutive steps and nothing after step 44."""
    from relcache.methods import schedules

    errs = tuple(0.06 if i < 4 else 0.007 for i in range(50))
    monkeypatch.setattr(schedules, "GAP_FLOOR", None)
    full, _ = _run(_ScriptedErrors(target_nfc=22, errs=errs), [torch.zeros(1, 4)] * 50)
    assert len(full) == 22 and full[-1] <= 44
    assert any(b - a == 1 for a, b in zip(full[2:], full[3:], strict=False))
    # a floor of 2 allows gaps of 1 while the even gap is at most 2, which 1.5 refuses: from step 33 (12 used, even
    # gap 16 / 10 = 1.6) one step apart until step 38 (17 used, 11 / 5 = 2.2 > 2), then two apart, ending at 48
    monkeypatch.setattr(schedules, "GAP_FLOOR", 2.0)
    full, _ = _run(_ScriptedErrors(target_nfc=22, errs=errs), [torch.zeros(1, 4)] * 50)
    assert full[11:] == [33, 34, 35, 36, 37, 38, 40, 42, 44, 46, 48]


def test_rcs_sample_whose_forecast_overflows_makes_the_step_full():
    """float16 probes, sample 1 near the top: 30000 then 45000 at steps 0 and 1, so its order-1 forecast at step 3
    is 45000 + 2 · 15000 = 75000, inf in float16, and its error +inf (the probe itself is finite). Sample 0 moves by
    0.001 a step (error about 0.001). Left out of the mean, the inf sample let steps 2-5 stay cached under threshold
    0.5; it now makes its step full (and is counted as not finite). With target_nfc, calibrating tau, the step is
    full while the budget lasts and tau is not set to inf."""
    def probe(s: int) -> torch.Tensor:
        return torch.stack([torch.full((4, 4), 1.0 + 0.001 * s),
                            torch.full((4, 4), 30000.0 + 15000.0 * min(s, 1))]).half()

    sched = InputError(threshold=0.5, order=1)
    state = sched.new_state(6)
    full = [s for s in range(6) if sched.decide(state, s, probe(s))]
    # step 2 (k = 1) forecasts 45000 + 15000 = 60000 for sample 1: finite, error 1/3 < 0.5, cached; step 3 (k = 2)
    # is the overflow: full; then k = 1 from step 3 forecasts 45000 again: cached
    assert full == [0, 1, 3]
    assert state.errors[3] == float("inf") and state.nonfinite == {3: 1}
    budget = InputError(target_nfc=4, order=1)
    state = budget.new_state(6)
    full = [s for s in range(6) if budget.decide(state, s, probe(s))]
    assert 3 in full and len(full) == 4
    assert state.tau is None or state.tau < float("inf")
