"""Wan 2.2's two experts: what the per-expert stats say in the middle of a generation, and the ``Experts`` guard
(found by a mutation review; the pipeline and its switch as in test_wan22_experts.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from families import CASES  # noqa: E402
from test_wan22_experts import STEPS, SWITCH, wan22_pipe  # noqa: E402
from torch import nn  # noqa: E402

import relcache  # noqa: E402
from relcache.runtime.experts import Expert, Experts  # noqa: E402


def test_each_expert_reports_the_cache_memory_it_holds_mid_generation():
    """The caches held after a step are the running expert's (the other's were dropped at the switch): its stats
    report them all, the other expert's none; after the last step nothing is held."""
    pipe = wan22_pipe()
    seen: dict[int, tuple[int, int, int]] = {}
    peaks: dict[int, tuple[int, ...]] = {}  # (total, each expert's): the peaks are reported in the total only

    def note(_pipe, i, _t, kwargs):
        st = relcache.stats(pipe)
        seen[i] = (st.cache_bytes, st.experts["transformer"].cache_bytes, st.experts["transformer_2"].cache_bytes)
        peaks[i] = (st.peak_cache_bytes, *(c.peak_cache_bytes + sum(c.peak_module_bytes.values())
                                           for e in st.experts.values() for c in e.contexts.values()))
        return kwargs

    with relcache.cached(pipe, relcache.FORA(interval=3, warmup=1)):
        pipe(**CASES["wan"].kwargs(), num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="latent",
             callback_on_step_end=note)
    assert sorted(seen) == list(range(STEPS))
    for i, (total, high, low) in seen.items():
        if i < SWITCH:
            assert total > 0 and (high, low) == (total, 0), i
        elif i < STEPS - 1:
            assert total > 0 and (high, low) == (0, total), i
        else:  # the caches go once the last step's calls returned
            assert (total, high, low) == (0, 0, 0)
    assert all(peaks[i][0] >= seen[i][0] and peaks[i][0] > 0 and not any(peaks[i][1:]) for i in seen)


def test_experts_serve_two_or_more_transformers():
    one = Expert("transformer", nn.Linear(1, 1), range(0, 2))
    with pytest.raises(ValueError, match="two or more"):
        Experts([one])
    two = Experts([one, Expert("transformer_2", nn.Linear(1, 1), range(2, 3))])
    assert [two.of_module(i).name for i in range(3)] == ["transformer", "transformer", "transformer_2"]


def test_each_expert_reports_the_errors_of_its_own_steps_and_modules():
    """RFC never reaching its threshold: full steps 0, 1 and the switch; input errors at the other steps. Each
    expert's stats hold the input errors of the steps it served and the module errors of its own modules only."""
    pipe = wan22_pipe()
    with relcache.cached(pipe, relcache.RFC(threshold=100.0, order=2), record_errors=True):
        pipe(**CASES["wan"].kwargs(), num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="latent")
        st = relcache.stats(pipe)
    assert st.full_steps == [0, 1, SWITCH]
    assert sorted(st.contexts["cond"].input_errors) == [2, 3, 5, 6, 7]
    for name, served in (("transformer", [2, 3]), ("transformer_2", [5, 6, 7])):
        for ctx in ("cond", "uncond"):
            got = st.experts[name].contexts[ctx]
            assert sorted(got.input_errors) == served, (name, ctx)
            assert len(got.module_errors) == 6 and all(m.startswith(f"{name}.blocks.") for m in got.module_errors)
            assert all(sorted(errs) == served for errs in got.module_errors.values()), (name, ctx)
    for ctx, total in st.contexts.items():  # the experts' FLOPs split the context's
        high, low = (st.experts[n].contexts[ctx] for n in ("transformer", "transformer_2"))
        assert 0 < high.full_flops < total.full_flops and 0 < low.full_flops < total.full_flops
        assert high.full_flops + low.full_flops == pytest.approx(total.full_flops)
        assert high.executed_flops + low.executed_flops == pytest.approx(total.executed_flops)


def test_a_contexts_stats_cut_to_an_experts_steps_and_modules():
    """``_restrict`` by hand: every per-step field keeps the expert's steps only, the module errors its modules only;
    the FLOPs are the expert's own counters; cache memory only where the expert runs now; no peaks."""
    from relcache.runtime.accounting import Counters
    from relcache.runtime.experts import _restrict
    from relcache.runtime.stats import ContextStats

    st = ContextStats("cond", 8, [0, 1, 4, 6], 4, 0.5, 40.0, 80.0, input_errors={2: 0.1, 5: 0.2},
                      module_errors={"transformer.a": {2: 1.0}, "transformer_2.a": {5: 2.0, 7: 3.0}},
                      uncond_skipped_steps=[3, 5], nonfinite_samples={2: 1, 5: 2}, cache_bytes=100,
                      peak_cache_bytes=300, peak_module_bytes={"transformer_2.a": 300})
    got = _restrict(st, {4, 5, 6, 7}, Counters(30.0, 40.0, 60.0, 80.0), {"transformer_2.a"}, True, None)
    assert (got.num_steps, got.full_steps, got.nfc) == (4, [4, 6], 2)
    assert got.input_errors == {5: 0.2} and got.nonfinite_samples == {5: 2} and got.uncond_skipped_steps == [5]
    assert got.module_errors == {"transformer_2.a": {5: 2.0, 7: 3.0}}
    assert (got.executed_flops, got.full_flops, got.flops_fraction) == (30.0, 40.0, 0.75)
    assert (got.model_executed_flops, got.model_full_flops, got.model_flops_fraction) == (60.0, 80.0, 0.75)
    assert (got.cache_bytes, got.peak_cache_bytes, got.peak_module_bytes) == (100, 0, {})
    idle = _restrict(st, {0, 1, 2, 3}, Counters(), {"transformer.a"}, False, "counting off")
    assert idle.cache_bytes == 0 and idle.nonfinite_samples == {2: 1} and idle.full_flops == 80.0  # FLOPs untouched
