"""Calibrating a fixed schedule: which steps to compute fully, for one model, sampler and budget (issue 19).

``search_steps`` is a coordinate descent over full-step sets of a fixed size: starting from a given set (e.g. the
steps RCS chose on the same samples), each step after the warm-up is moved by up to ``radius`` steps either way,
and a move is kept when the caller's error falls; rounds repeat until none helps. The error is the caller's
(typically the rel L1 of a calibration batch, generated with the candidate steps, against full computation), so
the search knows nothing of models. The steps found go into ``relcache.Steps`` or ``relcache.RFCPlus(full_steps=)``
for later generations; docs/results.md measures them on seeds the search never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from ..errors import ConfigError, check_int
from ..methods.schedules import Steps


def search_steps(error: Callable[[Steps], float], start: Sequence[int], num_steps: int, fixed: int = 2,
                 radius: int = 3, rounds: int = 3, progress: bool = True) -> tuple[Steps, float, int]:
    """``(best steps, their error, how many sets were evaluated)``: coordinate descent from ``start``.

    ``error(steps)`` measures one candidate (lower is better). The first ``fixed`` steps (the warm-up) never move;
    every candidate keeps the steps strictly increasing and below ``num_steps``; per position the moves are tried in
    the order -radius .. -1, 1 .. radius, and a move is kept at once when it lowers the error (first improvement).
    At most ``rounds`` rounds; the search stops early after a round that kept no move.
    """
    n = check_int("num_steps", num_steps, 1)
    best = Steps(tuple(start), num_steps=n)
    fixed = check_int("fixed", fixed, 1, len(best.steps))
    radius = check_int("radius", radius, 1)
    rounds = check_int("rounds", rounds, 0)
    moves = [d for d in range(-radius, radius + 1) if d]
    best_err, evaluated = float(error(best)), 1
    if best_err != best_err:  # NaN: nothing can compare lower
        raise ConfigError("error(start) is NaN: the search needs a finite error to improve on")
    positions = range(fixed, len(best.steps))
    with tqdm(total=rounds * len(positions), disable=not progress, desc="search_steps") as bar:
        for _ in range(rounds):
            improved = False
            for j in positions:
                for d in moves:
                    cand = list(best.steps)
                    cand[j] += d
                    if cand[j] <= cand[j - 1] or (j + 1 < len(cand) and cand[j] >= cand[j + 1]) or cand[j] >= n:
                        continue
                    candidate = Steps(tuple(cand), num_steps=n)
                    err = float(error(candidate))
                    evaluated += 1
                    if err < best_err:
                        best, best_err, improved = candidate, err, True
                bar.update()
                bar.set_postfix(error=f"{best_err:.4g}")
            if not improved:
                break
    return best, best_err, evaluated
