"""Calibrating a fixed schedule: which steps to compute fully, for one model, sampler and budget (issue 19).

``search_steps`` is a coordinate descent over full-step sets of a fixed size: starting from a given set (e.g. the
steps RCS chose on the same samples), each step after the warm-up is moved by ``-radius .. radius`` steps from
the best set so far (after a kept move the rest count from the new place, so a step may travel further in one round),
and a move is kept when the caller's error falls; rounds repeat until none helps. A set already measured is not
measured again. The error is the caller's
(typically the rel L1 of a calibration batch, generated with the candidate steps, against full computation), so
the search knows nothing of models. The steps found go into ``relcache.Steps`` or ``relcache.RFCPlus(full_steps=)``
for later generations; docs/results.md measures them on seeds the search never saw. ``calibrate_steps`` runs the
whole calibration on a model: full computation, RFC's steps as the start, then the search (``relcache calibrate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import api
from ..errors import ConfigError, check_int
from ..methods.config import RFC, CacheConfig
from ..methods.history import relative_l1
from ..methods.predictors import Predictor
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
    tried = {best.steps}  # each candidate is a generation of the caller's batch: never twice (found by review)
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
                    if tuple(cand) in tried:  # measured already, and not better than the best then or now
                        continue
                    tried.add(tuple(cand))
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


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate_steps`` found for one budget, all measured on the calibration batch: the steps and their
    rel L1 against full computation, the same predictor's at the start (RFC's steps), and RFC's own."""

    steps: Steps
    error: float
    start_error: float
    rfc_steps: tuple[int, ...]
    rfc_error: float
    evaluated: int  # generations of the batch the search ran, the start's included

    def config(self, predictor: Predictor) -> CacheConfig:
        """``predictor`` with the calibrated steps: what to enable for later generations."""
        return CacheConfig(predictor, self.steps, name=f"{type(predictor).__name__} x steps {list(self.steps.steps)}")


def fit_count(steps: Sequence[int], nfc: int, num_steps: int, fixed: int = 2) -> tuple[int, ...]:
    """``steps`` made ``nfc`` long: a missing step goes in the middle of the largest gap (the last step's gap to
    ``num_steps`` included), a step too many is dropped where its two gaps sum least (the first ``fixed`` stay).
    (choice) RCS may realise one step more or less than its target; the search needs exactly ``nfc``."""
    out = sorted(set(steps))
    while len(out) < nfc:
        gaps = [(b - a, a, b) for a, b in zip(out, [*out[1:], num_steps], strict=True)]
        width, a, b = max(gaps)
        if width < 2:
            raise ConfigError(f"cannot place {nfc} full steps in {num_steps} steps")
        out = sorted([*out, (a + b) // 2])
    while len(out) > nfc:
        ends = [*out, num_steps]
        j = min(range(fixed, len(out)), key=lambda i: ends[i + 1] - out[i - 1])
        out.pop(j)
    return tuple(out)


def calibrate_steps(model: torch.nn.Module, generate: Callable[[], torch.Tensor], nfc: int, num_steps: int,
                    predictor: Predictor, *, radius: int = 3, rounds: int = 3,
                    progress: bool = True) -> Calibration:
    """Calibrate ``nfc`` full steps of ``num_steps`` for ``predictor`` on ``model``.

    ``generate()`` makes the calibration batch: the same inputs and noise at every call (fix its generator's seed
    inside), announcing ``num_steps`` (``relcache.begin_generation``, or a pipeline relcache watches). It first runs
    with caching off (the reference), then with ``RFC(target_nfc=nfc)`` (the start: RFC's steps, ``fit_count``-ed to
    ``nfc``), then once per candidate of ``search_steps`` with ``predictor`` and ``Steps``; the error is the rel L1 of
    the batch against the reference. Use the steps on other inputs than the batch's: docs/results.md measures how
    they carry over."""
    n = check_int("num_steps", num_steps, 3)
    nfc = check_int("nfc", nfc, 3, n)
    if api.is_enabled(model):
        raise ConfigError("calibrate_steps enables its own configurations: disable caching on the model first")

    def run(config: CacheConfig) -> tuple[torch.Tensor, list[int]]:
        api.enable(model, config)
        try:
            out = generate()
            return out, list(api.stats(model).full_steps)
        finally:
            api.disable(model)

    with torch.no_grad():
        ref = generate()
        rfc_out, rfc_steps = run(RFC(order=max(1, getattr(predictor, "order", 2)), target_nfc=nfc))
        start = fit_count(rfc_steps, nfc, n)
        start_error: list[float] = []

        def error(steps: Steps) -> float:
            err = relative_l1(run(CacheConfig(predictor, steps))[0], ref)
            if not start_error:
                start_error.append(err)
            return err

        steps, err, evaluated = search_steps(error, start, n, radius=radius, rounds=rounds, progress=progress)
    return Calibration(steps, err, start_error[0], tuple(rfc_steps), relative_l1(rfc_out, ref), evaluated)
