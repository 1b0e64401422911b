"""``search_steps``' argument ranges and the rules on its candidates, and ``fit_count``'s edge cases, by hand."""

import pytest

from relcache import ConfigError, Steps
from relcache.evaluation.steps_search import fit_count, search_steps


def _third_step(seen):
    """An error that is the third step itself (earlier is better), logging every set measured."""
    def error(steps: Steps) -> float:
        seen.append(steps.steps)
        return float(steps.steps[2])

    return error


def _distance(target, seen):
    def error(steps: Steps) -> float:
        seen.append(steps.steps)
        return float(sum(abs(a - b) for a, b in zip(steps.steps, target, strict=True)))

    return error


def test_the_warm_up_is_at_least_one_step_and_at_most_the_whole_start():
    seen = []
    error = _distance((0, 1, 7), seen)
    with pytest.raises(ConfigError, match=r"fixed must be an integer in 1\.\.3, got 0"):
        search_steps(error, (0, 1, 5), num_steps=10, fixed=0, progress=False)
    with pytest.raises(ConfigError, match=r"fixed must be an integer in 1\.\.3, got 4"):
        search_steps(error, (0, 1, 5), num_steps=10, fixed=4, progress=False)
    assert seen == []
    # every step fixed: nothing moves, the start alone is measured
    best, err, evaluated = search_steps(error, (0, 1, 5), num_steps=10, fixed=3, progress=False)
    assert (best.steps, err, evaluated) == ((0, 1, 5), 2.0, 1) and seen == [(0, 1, 5)]


def test_zero_rounds_measure_the_start_only_and_fewer_are_refused():
    seen = []
    error = _distance((0, 1, 7), seen)
    best, err, evaluated = search_steps(error, (0, 1, 5), num_steps=10, rounds=0, progress=False)
    assert (best.steps, err, evaluated) == ((0, 1, 5), 2.0, 1) and seen == [(0, 1, 5)]
    with pytest.raises(ConfigError, match="rounds must be an integer >= 0, got -1"):
        search_steps(error, (0, 1, 5), num_steps=10, rounds=-1, progress=False)


def test_a_move_onto_a_neighbouring_step_is_skipped_not_measured():
    # radius 1 from (0, 1, 5, 6), best at (0, 1, 5, 9): the third step tries 4 (worse) and 6 (the next step: skipped);
    # the last tries 5 (the previous step: skipped) and 7 (better: kept)
    seen = []
    best, err, evaluated = search_steps(_distance((0, 1, 5, 9), seen), (0, 1, 5, 6), num_steps=10, radius=1,
                                        rounds=1, progress=False)
    assert seen == [(0, 1, 5, 6), (0, 1, 4, 6), (0, 1, 5, 7)]
    assert best.steps == (0, 1, 5, 7) and err == 2.0 and evaluated == 3


def test_the_start_is_never_measured_again():
    # from (0, 1, 5): 2 is kept at once (-3); from 2 the moves +1 .. +3 give 3, 4 and 5, the start: not measured again
    seen = []
    best, err, evaluated = search_steps(_third_step(seen), (0, 1, 5), num_steps=10, radius=3, rounds=1,
                                        progress=False)
    assert [s[2] for s in seen] == [5, 2, 3, 4] and evaluated == 4
    assert best.steps == (0, 1, 2) and err == 2.0


def test_fit_count_refuses_a_budget_the_steps_cannot_hold():
    with pytest.raises(ConfigError, match="cannot place 4 full steps in 3 steps"):
        fit_count([0, 1, 2], 4, 3)
    assert fit_count([0, 2], 3, 3) == (0, 1, 2)  # a gap of 2 still takes one step


def test_fit_count_counts_a_repeated_step_once():
    assert fit_count([0, 1, 5, 5], 4, 10) == (0, 1, 5, 7)
    assert fit_count([0, 1, 5, 5], 3, 10) == (0, 1, 5)


def test_fit_count_drops_the_step_whose_neighbours_are_closest():
    # the sums of the two gaps around 2, 6 and 7: 6 - 1 = 5, 7 - 2 = 5, 10 - 6 = 4: 7 goes
    assert fit_count([0, 1, 2, 6, 7], 4, 10) == (0, 1, 2, 6)
    # 2 - 0 = 2 around 1 would be the least, but the warm-up stays: 5 - 1 = 4 around 2 is next
    assert fit_count([0, 1, 2, 5, 9], 4, 10, fixed=2) == (0, 1, 5, 9)
    assert fit_count([0, 1, 2, 5, 9], 4, 10, fixed=1) == (0, 2, 5, 9)
