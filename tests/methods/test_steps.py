"""A schedule fixed in advance (``Steps``), its search (``search_steps``) and ``RFCPlus(full_steps=...)``."""

import warnings

import pytest
import torch
from conftest import run_loop, tiny_dit

import relcache
from relcache import ConfigError, Steps
from relcache.evaluation.steps_search import search_steps
from relcache.methods.plus import RelationalPlus


def test_steps_decide_exactly_the_listed_steps():
    sched = Steps((0, 1, 5, 9))
    assert [i for i in range(12) if sched.decide(None, i, None)] == [0, 1, 5, 9]
    assert sched.full_steps(6) == [0, 1, 5]
    assert Steps([0, 3]).steps == (0, 3)  # any sequence, stored as a tuple


@pytest.mark.parametrize("steps", [(), (1, 2), (0, 2, 2), (0, 3, 1), (0, -1), (0, 1.5), 5, "0,1"])
def test_steps_must_start_at_zero_and_increase(steps):
    with pytest.raises(ConfigError, match="steps"):
        Steps(steps)


def test_steps_num_steps_is_checked_against_the_generation():
    with pytest.raises(ConfigError, match="num_steps"):
        Steps((0, 1, 50), num_steps=50)
    sched = Steps((0, 1, 7), num_steps=10)
    assert sched.new_state(10) is None and sched.new_state(None) is None  # None: the loop did not say
    with pytest.raises(ConfigError, match="10-step generation, got 12"):
        sched.new_state(12)


def test_steps_past_the_generations_end_warn_and_a_string_is_refused_as_such():
    """Without ``num_steps`` a listed step past the end was dropped without a word (found by review)."""
    sched = Steps((0, 1, 5, 30))
    with pytest.warns(RuntimeWarning, match=r"full steps \[30\] are past the end of this 10-step generation"):
        assert sched.new_state(10) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.new_state(31)
        sched.new_state(None)  # the loop did not say: nothing to check
    with pytest.raises(ConfigError, match=r"sequence of step indices \(e.g. \[0, 1, 5\]\), got '0,1'"):
        Steps("0,1")  # read character by character, it said "got '0'"


def test_steps_every_step_full_only_when_every_step_is_listed():
    assert Steps((0, 1, 2), num_steps=3).every_step_full
    assert not Steps((0, 1, 2)).every_step_full and not Steps((0, 2), num_steps=3).every_step_full


def test_a_generation_of_another_length_is_refused_at_its_first_step():
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    relcache.enable(model, relcache.RFCPlus(full_steps=Steps((0, 1, 4), num_steps=8)))
    try:
        with pytest.raises(ConfigError, match="8-step generation, got 10"):
            run_loop(model, x, torch.tensor([1, 2]), steps=10)
    finally:
        relcache.disable(model)


def test_a_generation_with_steps_computes_exactly_those_steps():
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    relcache.enable(model, relcache.RFCPlus(full_steps=[0, 1, 4, 8]))
    try:
        run_loop(model, x, torch.tensor([1, 2]), steps=10)
        st = relcache.stats(model)
    finally:
        relcache.disable(model)
    assert st.full_steps == [0, 1, 4, 8] and st.nfc == 4


def test_rfcplus_full_steps_preset():
    cfg = relcache.RFCPlus(order=2, full_steps=[0, 1, 5])
    assert isinstance(cfg.predictor, RelationalPlus) and cfg.predictor.order == 2
    assert cfg.schedule == Steps((0, 1, 5))
    given = Steps((0, 2), num_steps=4)
    assert relcache.RFCPlus(full_steps=given).schedule is given
    for extra in ({"target_nfc": 3}, {"threshold": 0.1}, {"max_skip": 2}, {"warmup": 3}):
        with pytest.raises(ConfigError, match="full_steps fixes the schedule"):
            relcache.RFCPlus(full_steps=[0, 1], **extra)


def _distance(target):
    """An error whose minimum is ``target``, with one evaluation log."""
    seen = []

    def error(steps: Steps) -> float:
        seen.append(steps.steps)
        return float(sum(abs(a - b) for a, b in zip(steps.steps, target, strict=True)))

    return error, seen


def test_search_steps_walks_to_the_minimum_and_keeps_the_rules():
    target = (0, 1, 9, 15, 19)
    error, seen = _distance(target)
    best, err, evaluated = search_steps(error, (0, 1, 5, 10, 18), num_steps=20, radius=3, rounds=5, progress=False)
    assert best.steps == target and err == 0 and best.num_steps == 20
    assert evaluated == len(seen)
    for steps in seen:  # every candidate: warm-up fixed, strictly increasing, inside the generation
        assert steps[:2] == (0, 1) and all(b > a for a, b in zip(steps, steps[1:], strict=False)) and steps[-1] < 20


def test_search_steps_first_round_by_hand():
    # from (0, 1, 5), minimum at 7: position 2 tries the moves -3 .. -1, 1 .. 3 in order, each from the best so far:
    # 2, 3, 4 (worse), 6 (better: kept), then +2 and +3 from 6: 8 (as good as 6, not kept) and 9
    error, seen = _distance((0, 1, 7))
    best, err, _ = search_steps(error, (0, 1, 5), num_steps=10, radius=3, rounds=1, progress=False)
    assert [s[2] for s in seen] == [5, 2, 3, 4, 6, 8, 9]
    assert best.steps == (0, 1, 6) and err == 1
    best, err, _ = search_steps(error, (0, 1, 5), num_steps=10, radius=3, rounds=2, progress=False)
    assert best.steps == (0, 1, 7) and err == 0


def test_search_steps_never_measures_a_set_twice():
    """Moves count from the best set so far, so a later move can come back to a set measured earlier in the round:
    (0, 1, 7, 20) was generated twice from (0, 1, 10, 20) (found by review). Each is one generation of the batch."""
    seen: list[tuple[int, ...]] = []

    def error(steps: Steps) -> float:  # the third step as early as possible
        seen.append(steps.steps)
        return float(steps.steps[2])

    best, err, evaluated = search_steps(error, (0, 1, 10, 20), num_steps=30, radius=3, rounds=2, progress=False)
    assert len(seen) == len(set(seen)) == evaluated
    # the third step from 10: -3 gives 7, -2 from there 5, -1 from there 4 (each kept); +1 .. +3 from 4 give 5
    # (measured: skipped), 6 (measured now) and 7 (skipped); then the last step moves to 17
    assert seen[:6] == [(0, 1, 10, 20), (0, 1, 7, 20), (0, 1, 5, 20), (0, 1, 4, 20), (0, 1, 6, 20),
                        (0, 1, 4, 17)]
    assert best.steps == (0, 1, 2, 20) and err == 2.0


def test_search_steps_stops_after_a_round_without_a_move_and_checks_its_arguments():
    error, seen = _distance((0, 1, 5))
    best, err, evaluated = search_steps(error, (0, 1, 5), num_steps=10, rounds=4, progress=False)
    assert best.steps == (0, 1, 5) and err == 0 and evaluated == 1 + 6  # one round only: nothing moved
    with pytest.raises(ConfigError, match="radius"):
        search_steps(error, (0, 1, 5), num_steps=10, radius=0, progress=False)
    with pytest.raises(ConfigError, match="steps must all be < num_steps"):
        search_steps(error, (0, 1, 5), num_steps=5, progress=False)
    with pytest.raises(ConfigError, match="NaN"):
        search_steps(lambda s: float("nan"), (0, 1, 5), num_steps=10, progress=False)


def test_a_list_chosen_for_another_length_is_refused_pointing_to_the_command():
    """The refusal pointed to ``steps_search.search_steps``, a function that needs an error function of one's own,
    where the list came from ``relcache calibrate`` (found by review): it names the command with the length."""
    with pytest.raises(ConfigError, match=r"chosen for a 10-step generation, got 12 steps: calibrate them again for "
                                          r"this length \(relcache calibrate --steps 12"):
        Steps((0, 1, 4, 7), num_steps=10).check_num_steps(12)
