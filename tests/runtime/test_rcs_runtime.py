"""RCS (``InputError``) as the runtime drives it: the target-NFC threshold's rescale against hand-derived decisions,
and, on a CFG batch, the input error read on the conditional rows only."""

import dataclasses
import math

import pytest
import torch
from conftest import tiny_dit

import relcache
from relcache import RFC, CFGCache, InputError

# -- target NFC: the threshold rescale -------------------------------------------------------------------------------


def _scripted(schedule, errors, num_steps):
    """Drive ``schedule`` with the per-sample errors ``errors`` (step -> e(i)) passed as the runtime's measurement
    (``measured``), on a fixed-shape probe: (full steps, final state, tau after each step)."""
    state = schedule.new_state(num_steps)
    probe = torch.zeros(1, 3)
    full, taus = [], []
    for i in range(num_steps):
        measured = torch.tensor([errors[i]], dtype=torch.float64) if i in errors else None
        if schedule.decide(state, i, probe, measured):
            full.append(i)
        taus.append(state.tau)
    return full, state, taus


# T = 12, target_nfc = 5, warm-up 2 (steps 0, 1 full, used 2, last full 1).
# First gap: the even gap (T - 1 - 1) / 3 = 10/3, so full at k = 4 (step 5) with tau = E = e2 + e3 + e4 + e5 = 4.
# After step 5: used 3, budget 2, need (12 - 5 - 1) / 2 = 3, realised (5 - 2 + 1) / 1 = 4 -> tau = 4 sqrt(3/4).
EVEN = {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}
SHRINK = {**EVEN, 6: 1.0, 7: 1.0, 8: 1.6, 9: 0.8, 10: 0.5, 11: 0.5}
# tau = 4 sqrt(3/4) = 3.4641 (no rescale: 4; inverted: 4 sqrt(4/3) = 4.6188); the gap cap is 1.5 * 3 = 4.5 steps.
# step 8: E = 1 + 1 + 1.6 = 3.6 > 3.4641 -> full (no rescale: 3.6 <= 4, full at step 9 where E = 4.4 > 4; inverted:
# 4.4 <= 4.6188 and k = 4 < 4.5, full at step 10 by the hard rule budget 2 >= 2 steps left).
# After step 8: used 4, budget 1, need (12 - 8 - 1) / 1 = 3, realised (8 - 2 + 1) / 2 = 3.5 -> tau *= sqrt(3 / 3.5).
# steps 9, 10: E = 0.8, 1.3 < tau; step 11: 1 step left for 1 in the budget -> full.
SHRINK_FULL = [0, 1, 5, 8, 11]
SHRINK_TAU = 4 * math.sqrt(3 / 4) * math.sqrt(3 / 3.5)
SPIKE = {**EVEN, 6: 5.0, 7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0, 11: 1.0}
# step 6: E = 5 > 3.4641 but k = 1 is below the shortest gap, 3 / 1.5 = 2 (the even gap over GAP_CAP); step 7:
# E = 6, k = 2 -> full. After it: used 4, budget 1, need (12 - 7 - 1) / 1 = 4, realised (7 - 2 + 1) / 2 = 3 ->
# tau = 4 sqrt(3/4) sqrt(4/3) = 4, grown: the budget was spent early. Steps 8..10: E = 1, 2, 3 < 4 (and k < 4 / 1.5
# before step 10); step 11 full by the hard rule. (No rescale: tau stays 3.4641, the same full steps; inverted:
# 4.6188 sqrt(3/4) = 4 at step 7, then 4 sqrt(3/4) = 3.4641.)
SPIKE_FULL = [0, 1, 5, 7, 11]
SPIKE_TAU = 4.0


@pytest.mark.parametrize(("errors", "expected_full", "expected_tau"),
                         [(SHRINK, SHRINK_FULL, SHRINK_TAU), (SPIKE, SPIKE_FULL, SPIKE_TAU)],
                         ids=["tau shrinks", "tau grows"])
def test_target_nfc_rescales_tau_toward_the_budget_hand_derived(errors, expected_full, expected_tau):
    """After each full step past the first gap, tau is scaled by sqrt(need / realised) (the mean gap the rest of the
    budget needs over the mean gap realised): the hand-derived decisions and tau for scripted errors. Dropping the
    rescale, or inverting its ratio, moves a full step."""
    schedule = InputError(target_nfc=5, warmup=2)
    full, state, taus = _scripted(schedule, errors, 12)
    assert full == expected_full
    assert state.used == 5 and state.errors == errors
    assert taus[4] is None  # not calibrated before the first gap ends
    assert taus[5] == pytest.approx(4 * math.sqrt(3 / 4), rel=1e-12)  # calibrated to E = 4, then rescaled
    assert state.tau == pytest.approx(expected_tau, rel=1e-12)


def test_a_spent_budget_computes_nothing_more_however_large_the_error():
    """target_nfc 4 of 12: the first gap is the even one ((12 - 1 - 1) / 2 = 5 steps: full at step 6, tau = E = 5),
    the spike from step 7 (E = 100 > 5) spends the budget once the gap reaches the shortest allowed, (12 - 6 - 1) / 1
    / 1.5 = 3.33 steps (step 10), and the error of 100 at step 11 computes nothing more: no full step once the budget
    is spent (with ``budget < 0`` for ``<= 0`` it divided by the spent budget)."""
    errors = {i: 1.0 for i in range(2, 7)} | {i: 100.0 for i in range(7, 12)}
    full, state, _ = _scripted(InputError(target_nfc=4, warmup=2), errors, 12)
    assert full == [0, 1, 6, 10] and state.used == 4


# -- a CFG batch: the conditional rows only --------------------------------------------------------------------------

STEPS = 10
COND, NULL = torch.tensor([3]), torch.tensor([999])


def _latents():
    """One latent per step, not depending on the outputs: a CFG batch repeats it, as pipelines do at every step."""
    g = torch.Generator().manual_seed(0)
    x0, d = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    return [x0 + 0.15 * i * d + 0.02 * i * i for i in range(STEPS)]


def _timestep(i, batch):
    return torch.full((batch,), 999 - 99 * i)


def _first_module_inputs(model, labels):
    """The first cached module's (block 0's attention) input at every step, the model uncached, on ``labels``'
    batch: the rows the schedule would read."""
    got = []
    handle = model.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, args, kwargs: got.append(args[0].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            for i, x in enumerate(_latents()):
                model(torch.cat([x] * len(labels)), timestep=_timestep(i, len(labels)), class_labels=labels)
    finally:
        handle.remove()
    return got


def _decisions(schedule, probes):
    state = schedule.new_state(len(probes))
    return [i for i, p in enumerate(probes) if schedule.decide(state, i, p)], state.errors


@pytest.mark.parametrize("cfg_cache", [CFGCache(interval=3, window_steps=(2, STEPS), align=False),
                                       CFGCache(interval=4, window_steps=(2, STEPS), skip_full=True)],
                         ids=["paper schedule", "aligned, decided before the call"])
def test_rcs_on_a_cfg_batch_reads_the_conditional_rows_only(cfg_cache):
    """On a CFG batch ``[cond; uncond]`` RCS's e(i) and decisions are those of the conditional rows alone (the half
    that runs at every step): the schedule driven directly on the conditional half's inputs gives the runtime's errors
    and full steps, while the whole batch's inputs (the halves differ: the class label enters block 0's adaLN) would
    give other errors and other full steps. Aligned, the decision is taken at the call's start from a pre-pass."""
    model = tiny_dit()
    config = dataclasses.replace(RFC(threshold=0.44), cfg_cache=cfg_cache)
    want_full, want_errors = _decisions(config.schedule, _first_module_inputs(model, COND))
    whole_full, whole_errors = _decisions(config.schedule, _first_module_inputs(model, torch.cat([COND, NULL])))
    assert whole_full != want_full  # the test tells the two apart
    assert all(abs(whole_errors[i] - want_errors[i]) > 5e-3 for i in want_errors)
    with relcache.cached(model, config):
        relcache.begin_generation(model, STEPS)
        with torch.no_grad():
            for i, x in enumerate(_latents()):
                model(torch.cat([x, x]), timestep=_timestep(i, 2), class_labels=torch.cat([COND, NULL]))
        st = relcache.stats(model)
    ctx = st.contexts["default"]
    assert st.uncond_skipped > 0  # the CFG batch was detected: its halves are row groups
    assert ctx.full_steps == want_full
    assert sorted(ctx.input_errors) == list(range(2, STEPS))
    assert ctx.input_errors == pytest.approx(want_errors, rel=1e-4)
