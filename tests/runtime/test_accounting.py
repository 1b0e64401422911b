"""The generation's stats from its call contexts' (``stats.combine``, ``CacheStats.nfc_per_context``), against
hand-computed numbers; and FLOP counting's handling of an out-of-memory error (``accounting``)."""

import dataclasses
import math

import pytest
import torch
from conftest import TORCH_RELEASE, tiny_dit
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import relcache
from relcache import FORA, CFGCache, ContextStats
from relcache.runtime.stats import combine

MODULES = {"blocks.0.attn": "attn", "blocks.0.ff": "mlp"}


def _two_contexts():
    """Two contexts with unequal FLOP totals, fractions, step counts and NFC."""
    cond = ContextStats(name="cond", num_steps=10, full_steps=[0, 1, 5], nfc=3, flops_fraction=30 / 100,
                        executed_flops=30.0, full_flops=100.0, model_flops_fraction=50 / 200,
                        model_executed_flops=50.0, model_full_flops=200.0, cache_bytes=100,
                        uncond_skipped_steps=[], nonfinite_samples={4: 1})
    uncond = ContextStats(name="uncond", num_steps=12, full_steps=[0, 2, 4, 6, 8], nfc=5,
                          flops_fraction=90 / 150, executed_flops=90.0, full_flops=150.0,
                          model_flops_fraction=120 / 160, model_executed_flops=120.0, model_full_flops=160.0,
                          cache_bytes=200, uncond_skipped_steps=[3, 7], nonfinite_samples={2: 2, 9: 1})
    return {"cond": cond, "uncond": uncond}


def test_combine_pools_flops_over_contexts_not_their_fractions():
    """Several contexts: the FLOP fractions are the pooled executed FLOPs over the pooled full FLOPs, i.e. each
    context's fraction weighted by its full FLOPs: (30 + 90) / (100 + 150) = 0.48, not the mean of 0.3 and 0.6
    (0.45), nor weighted by steps ((10 * 0.3 + 12 * 0.6) / 22 = 0.4636) or by NFC (0.4875). The same for the whole
    model: (50 + 120) / (200 + 160) = 17/36, not (0.25 + 0.75) / 2."""
    st = combine("m", _two_contexts(), shared_bytes=50, modules=MODULES)
    assert st.flops_fraction == 120 / 250 == 0.48
    assert st.model_flops_fraction == 170 / 360
    assert st.full_steps == [0, 1, 2, 4, 5, 6, 8] and st.nfc == 7  # the union of the contexts' full steps
    assert st.num_steps == 12  # the longest context
    assert st.uncond_skipped == 2
    assert st.cache_bytes == 100 + 200 + 50  # the contexts' and what they hold together
    assert st.nonfinite_samples == 2  # the most at one step of any context
    assert st.modules == MODULES and set(st.contexts) == {"cond", "uncond"}


def test_combine_of_one_context_is_that_context():
    """One context: its own numbers (plus the shared bytes), its fraction taken as it is."""
    only = _two_contexts()["uncond"]
    st = combine("m", {"uncond": only}, shared_bytes=7, modules=MODULES)
    assert (st.nfc, st.num_steps, st.full_steps) == (5, 12, [0, 2, 4, 6, 8])
    assert st.flops_fraction == 0.6 and st.model_flops_fraction == 0.75
    assert st.cache_bytes == 207 and st.uncond_skipped == 2 and st.nonfinite_samples == 2


def test_combine_with_nothing_counted_gives_nan_fractions():
    """Contexts whose full FLOPs sum to zero (nothing measured) give NaN fractions, not a division error or 0."""
    per = {name: dataclasses.replace(c, executed_flops=0.0, full_flops=0.0, model_executed_flops=0.0,
                                     model_full_flops=0.0)
           for name, c in _two_contexts().items()}
    st = combine("m", per, shared_bytes=0, modules=MODULES)
    assert math.isnan(st.flops_fraction) and math.isnan(st.model_flops_fraction)


def test_nfc_per_context_is_the_most_full_steps_of_one_context():
    """``nfc_per_context`` is what a per-context budget names: the largest context NFC (5 of 3 and 5), not the
    smallest, and not ``nfc`` (7, the union of the steps); with no context, ``nfc``."""
    st = combine("m", _two_contexts(), shared_bytes=0, modules=MODULES)
    assert (st.nfc_per_context, st.nfc) == (5, 7)
    assert dataclasses.replace(st, contexts={}).nfc_per_context == 7


def test_split_cfg_stats_count_the_uncond_context_own_full_steps():
    """Split CFG with CFG-Cache (paper schedule, refresh every 3 steps from step 1): "cond" computes every step;
    "uncond" runs only at step 0 (before the window) and the refresh steps 1, 4, 7, its other calls rebuilt. The
    generation's NFC per context is cond's 10, not uncond's 4; the modules' FLOP fraction is (10 + 4) / 20 calls of
    equal FLOPs."""
    steps = 10
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    config = dataclasses.replace(FORA(1), cfg_cache=CFGCache(interval=3, window_steps=(1, steps), align=False))
    with relcache.cached(dit, config):
        relcache.begin_generation(dit, steps)
        with torch.no_grad():
            for i in range(steps):
                t = torch.full((2,), 900 - 90 * i)
                for name, labels in (("cond", y), ("uncond", torch.full_like(y, 999))):
                    _set_cache_context(dit, CacheContext(name))
                    dit(x + 0.1 * i, timestep=t, class_labels=labels)
                _set_cache_context(dit, None)
        st = relcache.stats(dit)
    cond, uncond = st.contexts["cond"], st.contexts["uncond"]
    assert cond.full_steps == list(range(steps)) and uncond.full_steps == [0, 1, 4, 7]
    assert uncond.uncond_skipped_steps == [2, 3, 5, 6, 8, 9]
    assert (st.nfc_per_context, st.nfc) == (10, 10)
    assert cond.flops_fraction == 1.0 and uncond.flops_fraction == 0.4
    assert st.flops_fraction == (cond.executed_flops + uncond.executed_flops) / (cond.full_flops + uncond.full_flops)
    assert st.flops_fraction == 0.7


def test_printed_stats_are_a_short_summary_of_the_same_numbers():
    """``print(stats)`` gives a few lines (the README's one-line example prints it); ``repr`` keeps every field."""
    ctxs = {name: dataclasses.replace(c, cache_storage="bfloat16") for name, c in _two_contexts().items()}
    st = dataclasses.replace(combine("RFC(NFC=5, m=2)", ctxs, shared_bytes=0, modules=MODULES),
                             peak_cache_bytes=3 * 2**20)
    assert str(st).splitlines() == [
        "RFC(NFC=5, m=2): NFC 7 of 12 steps, full at [0, 1, 2, 4, 5, 6, 8]",
        "  FLOPs: 48.0% of full computation in the cached modules, 47.2% in the whole transformer",  # 17/36
        "  caches: peak 3.0 MiB, held bfloat16, 2 cached modules",
        "  CFG-Cache: 2 unconditional halves skipped",
        "  RCS: up to 2 samples with a non-finite input error at a step",
        "  context 'cond': NFC 3 of 10, full at [0, 1, 5]",
        "  context 'uncond': NFC 5 of 12, full at [0, 2, 4, 6, 8]"]
    assert "input_errors" in repr(st)
    off = dataclasses.replace(st, flops_unknown="FLOP counting is turned off")
    assert str(off).splitlines()[1] == "  FLOPs: unknown (FLOP counting is turned off)"


def test_out_of_memory_inside_a_measured_call_propagates_and_leaves_counting_on(monkeypatch):
    """An out-of-memory error raised under the FLOP counter's dispatch mode is the model's, not counting's: it
    propagates at once (before 2026-12-04 the call ran again uncounted, which on an H200 failed again while the first
    run's traceback held its tensors, and where it fit, FLOP counting was turned off with a wrong reason)."""
    from torch.utils import flop_counter

    from relcache.runtime import accounting
    from relcache.runtime.controller import Session

    original = flop_counter._FlopCounterMode.__torch_dispatch__  # the dispatch mode torch's counter enters

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # the frame name counting errors are told by
        if func is torch.ops.aten.gelu.default:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 MiB (simulated)")
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(flop_counter._FlopCounterMode, "__torch_dispatch__", __torch_dispatch__)
    model = tiny_dit()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    relcache.enable(model, FORA(2))
    calls = []
    monkeypatch.setattr(accounting.FlopMeter, "_uncounted", lambda self, *a: calls.append(a))
    relcache.begin_generation(model, 4)
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError, match="simulated"):
        model(x, timestep=torch.full((2,), 999), class_labels=labels)
    assert calls == []  # not run again uncounted
    session = relcache.api._session(model)
    assert isinstance(session, Session) and session.meter.unknown is None  # counting stays on
    relcache.disable(model)


# grouped-query attention: b 2, 4 query heads, 8 queries, 6 keys, head size 16. Per query head and sample, QK^T is
# (8 x 16) by (16 x 6) and AV (8 x 6) by (6 x 16), 2 * 8 * 16 * 6 FLOPs each: 2 * 2 * 4 * (2 * 8 * 16 * 6) in all
GQA_FLOPS = 2 * 2 * 4 * (2 * 8 * 16 * 6)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_counts_every_query_head(kv_heads):
    """Cosmos 3's and ACE-Step's attention shares each key/value head between a group of query heads: counted as
    the kernel computes it, each query head against its group's key/value head, as torch counts it from 2.12 on."""
    from relcache.runtime.accounting import flop_counter

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g)
    k, v = torch.randn(2, 2, kv_heads, 6, 16, generator=g).unbind(0)
    with torch.no_grad(), flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads < 4)
    assert counter.get_total_flops() == GQA_FLOPS


def test_grouped_queries_are_counted_where_torchs_formula_refuses_them(monkeypatch):
    """torch 2.11's SDPA formula refuses grouped-query shapes (FLOPs unknown for Cosmos 3 and ACE-Step there):
    with a formula as strict, relcache finds it refuses, adds its entries for the GPU kernels too, and counts the
    shapes through it with the key/value heads widened to the query's."""
    from relcache.runtime import accounting

    def strict(query_shape, key_shape, value_shape):  # torch 2.11's check, then its count
        if query_shape[1] != key_shape[1] or key_shape != value_shape:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
        b, h, s_q, d = query_shape
        return 2 * (2 * b * h * s_q * key_shape[2] * d)

    monkeypatch.setattr(accounting, "sdpa_flop_count", strict)
    assert not accounting._torch_counts_grouped_queries()
    extra = accounting._extra_formulas()
    assert torch.ops.aten._scaled_dot_product_efficient_attention in extra
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in extra
    for kv_heads in (4, 2, 1):
        kv = (2, kv_heads, 6, 16)
        assert accounting._grouped_sdpa_flops((2, 4, 8, 16), kv, kv) == GQA_FLOPS
    with pytest.raises(AssertionError):  # heads that do not group (3 of 4) stay refused, as torch refuses them
        accounting._grouped_sdpa_flops((2, 4, 8, 16), (2, 3, 6, 16), (2, 3, 6, 16))
    monkeypatch.undo()
    counts = TORCH_RELEASE >= (2, 12)  # torch's own formula counts grouped queries from 2.12 on
    assert accounting._torch_counts_grouped_queries() == counts
    assert (torch.ops.aten._scaled_dot_product_efficient_attention in accounting._extra_formulas()) == (not counts)
