"""Blocks compiled one by one (regional compilation) with relcache enabled. Each cached module's hook reaches its state
through its slot (``modules.ModuleSlot``), never by its index, so blocks of a class share their graphs: one per kind of
step, however many blocks. Hooks that still read a per-module index (batch modulation's) make each
block compile graphs of its own, so past dynamo's recompile limit per block class the rest run eagerly: relcache says
so once per enable, where it can happen (``Session._check_compiled_blocks``, ``regional.compiled_apart``)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import dit_pipe
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from families import flux_kwargs, flux_pipe
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import relcache
from relcache import RFC, CFGCache, TaylorSeer
from relcache.runtime.regional import captured_apart, compiled_apart

APART = "compiled one by one"


def _generations(pipe, n: int, **kwargs) -> list[str]:
    """Run ``n`` generations; relcache's warnings about blocks compiled apart."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            pipe(**kwargs, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    return [str(w.message) for w in caught if APART in str(w.message)]


@pytest.fixture
def regional():
    """flux_pipe (1 double, 2 single blocks) with TaylorSeer, its repeated blocks compiled (graphs run eagerly)."""
    torch._dynamo.reset()
    pipe = flux_pipe()
    relcache.enable(pipe, TaylorSeer(3))
    pipe.transformer.compile_repeated_blocks(backend="eager")
    yield pipe
    relcache.disable(pipe)
    torch._dynamo.reset()


@pytest.fixture
def regional_modulation():
    """dit_pipe (3 blocks) with TaylorSeer and batch modulation, each block compiled on its own (graphs run eagerly):
    the modulation hooks in the blocks read their projection's index."""
    torch._dynamo.reset()
    pipe = dit_pipe()
    relcache.enable(pipe, TaylorSeer(3), batch_modulation=True)
    for block in pipe.transformer.transformer_blocks:
        block.compile(backend="eager")
    yield pipe
    relcache.disable(pipe)
    torch._dynamo.reset()


def test_blocks_compiled_apart_share_their_graphs_and_are_not_warned(regional):
    """The two single blocks share their graphs: the class's code holds as many as the kinds of step need, with
    dynamo's limits raised so that none is cut off (2026-12-06: 4, the kinds of step and the first single block's
    input strides; 6 while the hooks read the module's index, a constant of each block's graphs: 3 per block)."""
    with torch._dynamo.config.patch(recompile_limit=64):
        assert _generations(regional, 2, **flux_kwargs()) == []
    variants = len(_debug_get_cache_entry_list(FluxSingleTransformerBlock.forward.__code__))
    assert 0 < variants <= 4, variants


@pytest.mark.parametrize(("config", "need"), [(RFC(target_nfc=2), 10), (TaylorSeer(3, order=4), 11),
                                            (RFC(target_nfc=2, order=1), None), (TaylorSeer(3), None)])
def test_a_predictor_needing_more_graphs_than_the_limit_is_warned_once(config, need):
    """Found by review: RFC with regional compilation needs about 10 graphs per block class on a FLUX pipeline (one per
    kind of step and history length; benchmarks/regional_compile.py --pipeline) against dynamo's 8, and the second
    generation ran 69 of 84 block calls eagerly without a word from relcache. Warned once per enable where the
    predictor's count passes the limit; not where it fits (TaylorSeer at order 2 and RFC at order 1: 7), nor with
    the limit raised."""
    torch._dynamo.reset()
    pipe = flux_pipe()
    relcache.enable(pipe, config)
    pipe.transformer.compile_repeated_blocks(backend="eager")
    try:
        got = _generations(pipe, 2, **flux_kwargs())
        if need is None:
            assert got == []
            return
        assert len(got) == 1, got
        assert got[0].startswith("relcache: blocks holding cached modules are compiled one by one"), got[0]
        assert f"each block class compiles about {need} graphs" in got[0]
        assert "recompile_limit (8) or accumulated_recompile_limit (256)" in got[0]
        assert f"to at least {2 * need} " in got[0]
        relcache.disable(pipe)
        with torch._dynamo.config.patch(recompile_limit=need):  # a limit that allows them: nothing to say
            relcache.enable(pipe, config)
            assert _generations(pipe, 1, **flux_kwargs()) == []
    finally:
        relcache.disable(pipe)
        torch._dynamo.reset()


def test_regional_compilation_is_warned_once_per_enable_naming_the_blocks(regional_modulation):
    got = _generations(regional_modulation, 2, class_labels=[1])
    assert len(got) == 1, got
    assert got[0].startswith("relcache: 3 BasicTransformerBlock blocks are compiled one by one"), got[0]
    assert "recompile_limit (8) and accumulated_recompile_limit (256)" in got[0]
    assert got[0].endswith("set both torch._dynamo.config limits to at least 24 (docs/how-it-works.md)"), got[0]
    relcache.disable(regional_modulation)
    relcache.enable(regional_modulation, TaylorSeer(3), batch_modulation=True)  # a new enable says it again
    assert len(_generations(regional_modulation, 1, class_labels=[1])) == 1


def test_no_warning_where_the_limit_allows_8_graphs_per_block(regional_modulation):
    with torch._dynamo.config.patch(recompile_limit=24):
        assert _generations(regional_modulation, 1, class_labels=[1]) == []


def test_the_accumulated_limit_counts_too(regional_modulation):
    """dynamo also caps every code object at ``accumulated_recompile_limit``: a raised ``recompile_limit`` alone is
    not enough where that cap is below 8 per block."""
    with torch._dynamo.config.patch(recompile_limit=24, accumulated_recompile_limit=15):
        got = _generations(regional_modulation, 1, class_labels=[1])
    assert len(got) == 1 and "accumulated_recompile_limit (15)" in got[0], got


def test_no_warning_without_compilation():
    pipe = flux_pipe()
    relcache.enable(pipe, TaylorSeer(3))
    try:
        assert _generations(pipe, 1, **flux_kwargs()) == []
    finally:
        relcache.disable(pipe)


def test_compiled_apart_counts_blocks_compiled_or_wrapped_that_hold_cached_modules():
    """Counted: blocks compiled in place (``nn.Module.compile``) or wrapped by ``torch.compile``, by class, where they
    hold a cached module, or whose ``forward`` is compiled; not the model compiled whole, nor compiled modules holding
    none."""
    model = flux_pipe().transformer
    single = model.single_transformer_blocks
    cached = [single[0].attn, single[1].attn]
    assert compiled_apart(model, cached) == {}
    torch.compile(model)  # whole: a wrapper outside the model
    assert compiled_apart(model, cached) == {}
    single[0].compile()
    assert compiled_apart(model, cached) == {"FluxSingleTransformerBlock": 1}
    single[1] = torch.compile(single[1])
    assert compiled_apart(model, cached) == {"FluxSingleTransformerBlock": 2}
    double = model.transformer_blocks[0]
    double.forward = torch.compile(double.forward)  # its forward compiled, the older way
    assert compiled_apart(model, [*cached, double.attn]) == {"FluxSingleTransformerBlock": 2, "FluxTransformerBlock": 1}
    assert compiled_apart(model, [model.proj_out]) == {}  # no compiled block holds a cached module


def test_blocks_compiled_apart_give_the_eager_run_on_a_cfg_batch_with_rfc_and_cfg_cache():
    """RFC with CFG-Cache on DiT's CFG batch, each block compiled on its own: the same images, full steps, skipped
    unconditional halves and FLOP fraction as eagerly, in each of three generations (the slots are bound again at
    each), and the third compiles no graph."""
    config = dataclasses.replace(RFC(target_nfc=4), cfg_cache=CFGCache(skip_full=True))

    def run(apart: bool) -> tuple[list[torch.Tensor], relcache.CacheStats]:
        torch._dynamo.reset()
        pipe = dit_pipe()
        relcache.enable(pipe, config)
        if apart:
            for block in pipe.transformer.transformer_blocks:
                block.compile(backend="eager")
        try:
            images, graphs, before = [], [], counters["stats"]["unique_graphs"]  # counters are per process
            with torch._dynamo.config.patch(recompile_limit=64):
                for _ in range(3):
                    images.append(pipe(class_labels=[1], num_inference_steps=6, generator=torch.manual_seed(0),
                                       output_type="pt")[0])
                    graphs.append(counters["stats"]["unique_graphs"] - before)
            # none compiled in the third (the first generation's first call, which measures FLOPs, runs the blocks
            # eagerly: the second compiles that kind of step)
            assert graphs[2] == graphs[1] and (graphs[0] > 0) == apart, graphs
            return images, relcache.stats(pipe)
        finally:
            relcache.disable(pipe)
            torch._dynamo.reset()

    eager, eager_stats = run(False)
    apart, apart_stats = run(True)
    assert apart_stats.uncond_skipped == eager_stats.uncond_skipped > 0
    assert apart_stats.full_steps == eager_stats.full_steps
    assert apart_stats.nfc == eager_stats.nfc < 6
    assert apart_stats.flops_fraction == pytest.approx(eager_stats.flops_fraction, rel=1e-9)
    for got, want in zip(apart, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_captured_apart_counts_blocks_compiled_to_replay_cuda_graphs():
    """Counted: blocks holding a cached module compiled with a mode that captures CUDA graphs (``reduce-overhead``,
    ``max-autotune``), that option, or the ``cudagraphs`` backend, however compiled; not the default mode,
    ``max-autotune-no-cudagraphs``, nor the eager backend. Nothing runs: compiling is lazy."""
    model = flux_pipe().transformer
    single = model.single_transformer_blocks
    cached = [single[0].attn, single[1].attn, model.transformer_blocks[0].attn]
    single[0].compile(mode="max-autotune-no-cudagraphs")
    single[1].compile(backend="eager")
    assert captured_apart(model, cached) == {} and compiled_apart(model, cached) == {"FluxSingleTransformerBlock": 2}
    single[0].compile(mode="reduce-overhead")
    single[1] = torch.compile(single[1], mode="max-autotune")
    assert captured_apart(model, cached) == {"FluxSingleTransformerBlock": 2}
    double = model.transformer_blocks[0]
    double.forward = torch.compile(double.forward, options={"triton.cudagraphs": True})
    assert captured_apart(model, cached) == {"FluxSingleTransformerBlock": 2, "FluxTransformerBlock": 1}
    double.forward = torch.compile(type(double).forward.__get__(double), backend="cudagraphs")
    assert captured_apart(model, cached)["FluxTransformerBlock"] == 1
    assert captured_apart(model, [model.proj_out]) == {}


def test_blocks_replaying_cuda_graphs_are_warned_once_per_enable_where_they_capture(monkeypatch):
    """Blocks compiled one by one to replay CUDA graphs would overwrite the records relcache holds as their graphs'
    outputs: warned once per enable, at the first call, where the latents' device is one inductor captures on (CUDA;
    here the CPU stands in for it). Not on a device it does not capture on, nor for blocks compiled without."""
    torch._dynamo.reset()
    pipe = flux_pipe()
    relcache.enable(pipe, TaylorSeer(3))
    try:
        pipe.transformer.compile_repeated_blocks(backend="cudagraphs")  # on CPU tensors its capture is skipped

        def warned(n: int) -> list[str]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(n):
                    pipe(**flux_kwargs(), num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
            return [str(w.message) for w in caught if "replay CUDA graphs" in str(w.message)]

        assert warned(1) == []  # the CPU: no capture
        monkeypatch.setattr("relcache.runtime.controller.CUDA_GRAPH_DEVICES", frozenset({"cpu", "cuda"}))
        relcache.disable(pipe)
        relcache.enable(pipe, TaylorSeer(3))
        got = warned(2)
        assert len(got) == 1, got
        assert got[0].startswith("relcache: 1 FluxTransformerBlock, 2 FluxSingleTransformerBlock blocks hold cached "
                                 "modules and are compiled one by one to replay CUDA graphs"), got[0]
        assert "torch.compile(pipe.transformer, mode=\"reduce-overhead\")" in got[0]
        pipe.transformer.compile_repeated_blocks(backend="eager")
        relcache.disable(pipe)
        relcache.enable(pipe, TaylorSeer(3))
        assert warned(1) == []
    finally:
        relcache.disable(pipe)
        torch._dynamo.reset()
