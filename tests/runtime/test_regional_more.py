"""Regional compilation (each repeated block compiled on its own, ``compile_repeated_blocks``) in cases
test_compiled_apart.py leaves out: split CFG (a "cond" and an "uncond" transformer call per step, each in its own call
context), Wan 2.2's two experts, each compiled regionally, and ``disable`` after a regional run. The reference is
always the same pipeline with relcache enabled and nothing compiled; ``backend="eager"`` runs dynamo's graphs as
traced, so outputs agree to rounding (RFC within 2.4e-7: a compiled record keeps RFE's Gram, ``Relational.record``).

Dynamo's graph counters are per process: graphs are counted as differences over this file's own generations."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanTransformerBlock  # noqa: E402
from families import WAN_TINY, wan_kwargs, wan_pipe  # noqa: E402
from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import relcache  # noqa: E402
from relcache import RFC, TaylorSeer  # noqa: E402

STEPS = 4


def wan22_pipe() -> WanPipeline:
    """The tiny Wan pipeline (split CFG, 2 blocks) with a second expert of the same config and other weights, switching
    half-way (boundary_ratio 0.5: at 6 steps the low-noise expert serves steps 3 to 5)."""
    one = wan_pipe()
    torch.manual_seed(1)
    expert = WanTransformer3DModel(**WAN_TINY, cross_attn_norm=True).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=one.vae, scheduler=one.scheduler,
                       transformer=one.transformer, transformer_2=expert, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe: WanPipeline, steps: int) -> torch.Tensor:
    """One generation's final latents (no VAE decode: the transformer's outputs are what is compared)."""
    return pipe(**wan_kwargs(), num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent").frames


def _experts(pipe: WanPipeline) -> list[torch.nn.Module]:
    return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]


def _runs(build: Callable[[], WanPipeline], config: relcache.CacheConfig, apart: bool, generations: int,
          steps: int = STEPS) -> dict[str, Any]:
    """``generations`` generations of ``build()`` under ``config``, with every expert's repeated blocks compiled on
    their own (``apart``) or nothing compiled: each generation's latents and stats, the graphs dynamo compiled by the
    end of each, and the graphs ``WanTransformerBlock.forward``'s code holds at the end. dynamo's default limits stand
    and a recompile-limit hit raises (``fail_on_recompile_limit_hit``) instead of running the block eagerly."""
    torch._dynamo.reset()
    pipe = build()
    relcache.enable(pipe, config)
    if apart:
        for model in _experts(pipe):
            model.compile_repeated_blocks(backend="eager")
    got: dict[str, Any] = dict(latents=[], stats=[], graphs=[])
    before = counters["stats"]["unique_graphs"]
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for _ in range(generations):
                got["latents"].append(_latents(pipe, steps))
                got["stats"].append(relcache.stats(pipe))
                got["graphs"].append(counters["stats"]["unique_graphs"] - before)
        got["block_graphs"] = len(_debug_get_cache_entry_list(WanTransformerBlock.forward.__code__))
    finally:
        relcache.disable(pipe)
        torch._dynamo.reset()
    return got


def _same_stats(got: relcache.CacheStats, want: relcache.CacheStats) -> None:
    """NFC, full steps and FLOP fractions, in total and in each call context."""
    assert (got.nfc, got.num_steps, got.full_steps) == (want.nfc, want.num_steps, want.full_steps)
    assert got.flops_fraction == pytest.approx(want.flops_fraction, rel=1e-9)
    assert got.model_flops_fraction == pytest.approx(want.model_flops_fraction, rel=1e-9)
    assert sorted(got.contexts) == sorted(want.contexts) == ["cond", "uncond"]
    for name, ctx in want.contexts.items():
        mine = got.contexts[name]
        assert (mine.nfc, mine.full_steps) == (ctx.nfc, ctx.full_steps), name
        assert mine.flops_fraction == pytest.approx(ctx.flops_fraction, rel=1e-9), name
        assert mine.model_flops_fraction == pytest.approx(ctx.model_flops_fraction, rel=1e-9), name


# -- split CFG: "cond" and "uncond" calls per step, blocks compiled one by one ----------------------------------------
# (config, full steps of 4, graphs the block class's code holds, graphs compiled in all): TaylorSeer's blocks trace
# whole, one graph per kind of step (2026-12-06: 4, as test_compiled_apart.py's FLUX single blocks); RFC's break at
# the decision, so its graphs sit in dynamo's resume functions (2026-12-06: 1 in the block's code, 14 in all). Graphs
# kept per block (the slots' state read by a Python index) double the first and raise the second (checked by mutation)
SPLIT = [
    pytest.param(RFC(target_nfc=3), [0, 1, 3], 1, 14, id="rfc"),
    pytest.param(TaylorSeer(2, warmup=1), [0, 2], 4, 4, id="taylorseer"),
]


@pytest.mark.parametrize(("config", "full", "block_graphs", "graphs"), SPLIT)
def test_split_cfg_with_blocks_compiled_apart_gives_the_eager_run(config, full, block_graphs, graphs):
    """Wan's pipeline calls the transformer twice per step, "cond" then "uncond". Both blocks compiled on their own
    give the eager run's latents, NFC, full steps and FLOP fractions in each context, in each of three generations (the
    slots are bound to the other context's records at every call); the two blocks share their graphs, no block hits
    dynamo's recompile limit, and the third generation compiles nothing."""
    eager = _runs(wan_pipe, config, apart=False, generations=3)
    apart = _runs(wan_pipe, config, apart=True, generations=3)
    assert eager["graphs"] == [0, 0, 0]
    for got, want in zip(apart["stats"], eager["stats"], strict=True):
        assert want.full_steps == full and all(c.full_steps == full for c in want.contexts.values())  # it caches
        _same_stats(got, want)
    for got, want in zip(apart["latents"], eager["latents"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert 0 < apart["block_graphs"] <= block_graphs, apart["block_graphs"]
    assert 0 < apart["graphs"][2] == apart["graphs"][1] <= graphs, apart["graphs"]


# -- Wan 2.2: two experts, both compiled regionally -------------------------------------------------------------------
# 6 steps, the switch at step 3 (full there): TaylorSeer plans 0, 2 and 4; RFC spends a budget of 4 over both experts.
# The experts' four blocks are of one class, so their graphs sit in one code object; the most graphs compiled in all:
# TaylorSeer's as one expert's (4), RFC's 17 (counted 2026-12-06). Until then the FLOP meter measured the rest of a
# call by its shapes alone, so the second expert's first call was not measured whole, and its modules inside compiled
# blocks never: its FLOP fraction was NaN, and RFC raised at the switch ("Attempt to trace forbidden callable
# set_stance": its decision broke the block's graph, and the module's own measurement ran from traced code)
EXPERT_STEPS = 6
EXPERT_CONFIGS = {"rfc": (RFC(target_nfc=4), 17), "taylorseer": (TaylorSeer(2, warmup=1), 4)}

@functools.cache
def _expert_runs(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Three generations of the two-expert pipeline under ``method``: eagerly and with both experts' blocks compiled
    one by one (kept for the file's two expert tests; a run that raises is not kept)."""
    config = EXPERT_CONFIGS[method][0]
    eager = _runs(wan22_pipe, config, apart=False, generations=3, steps=EXPERT_STEPS)
    return eager, _runs(wan22_pipe, config, apart=True, generations=3, steps=EXPERT_STEPS)


@pytest.mark.parametrize("method", ["rfc", "taylorseer"])
def test_two_experts_compiled_apart_give_the_eager_run(method):
    """Both experts' blocks compiled on their own: the eager run's latents and full steps, in total, per expert and
    per context, in each of three generations; the four blocks (one class) share their graphs, no recompile-limit
    hit, and the third generation compiles nothing."""
    eager, apart = _expert_runs(method)
    for got, want in zip(apart["stats"], eager["stats"], strict=True):
        assert 3 in want.full_steps and len(want.full_steps) < EXPERT_STEPS  # the switch is full; it caches
        assert (got.nfc, got.full_steps) == (want.nfc, want.full_steps)
        assert sorted(got.experts) == sorted(want.experts) == ["transformer", "transformer_2"]
        for name, expert in want.experts.items():
            mine = got.experts[name]
            assert (mine.nfc, mine.num_steps, mine.full_steps) == (expert.nfc, expert.num_steps, expert.full_steps)
            for ctx in ("cond", "uncond"):
                assert mine.contexts[ctx].full_steps == expert.contexts[ctx].full_steps, (name, ctx)
    for got, want in zip(apart["latents"], eager["latents"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert 0 < apart["block_graphs"] <= 4, apart["block_graphs"]  # as one expert's (test_split_cfg_...)
    assert 0 < apart["graphs"][2] == apart["graphs"][1] <= EXPERT_CONFIGS[method][1], apart["graphs"]


@pytest.mark.parametrize("method", ["rfc", "taylorseer"])
def test_two_experts_compiled_apart_count_the_eager_runs_flops(method):
    """The FLOP fractions, of the cached modules and of the whole transformer, in total and per expert and context."""
    eager, apart = _expert_runs(method)
    for got, want in zip(apart["stats"], eager["stats"], strict=True):
        assert got.flops_fraction == pytest.approx(want.flops_fraction, rel=1e-9)
        assert got.model_flops_fraction == pytest.approx(want.model_flops_fraction, rel=1e-9)
        for name, expert in want.experts.items():
            assert 0 < expert.flops_fraction < 1  # the eager run counted each expert, and it cached
            mine = got.experts[name]
            assert mine.flops_fraction == pytest.approx(expert.flops_fraction, rel=1e-9), name
            assert mine.model_flops_fraction == pytest.approx(expert.model_flops_fraction, rel=1e-9), name
            for ctx in ("cond", "uncond"):
                assert mine.contexts[ctx].flops_fraction == pytest.approx(
                    expert.contexts[ctx].flops_fraction, rel=1e-9), (name, ctx)


# -- disable after a regional run ------------------------------------------------------------------------------------
def _instance_attributes(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each submodule's instance attributes by name, but for what regional compilation sets (``_compiled_call_impl``,
    on the compiled blocks)."""
    return {name: sorted(set(vars(m)) - {"_compiled_call_impl"}) for name, m in model.named_modules()}


@pytest.mark.parametrize("config", [RFC(target_nfc=2), TaylorSeer(2, warmup=1)], ids=["rfc", "taylorseer"])
def test_disable_after_a_regional_run_leaves_the_plain_model(config):
    """After two cached generations with the blocks compiled on their own (the last step a cached one, whose graphs
    return forecasts), ``disable`` leaves the blocks compiled but nothing of relcache's in them: every module holds
    the attributes it held before ``enable`` (no hook, no forward of relcache's for a compiled graph's guards to
    match), and the pipeline gives the plain model's latents, as before ``enable``, in each of two generations."""
    torch._dynamo.reset()
    pipe = wan_pipe()
    try:
        plain = _latents(pipe, STEPS)
        before = _instance_attributes(pipe.transformer)
        relcache.enable(pipe, config)
        pipe.transformer.compile_repeated_blocks(backend="eager")
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            cached = [_latents(pipe, STEPS) for _ in range(2)]
        st = relcache.stats(pipe)
        assert STEPS - 1 not in st.full_steps and all(STEPS - 1 not in c.full_steps for c in st.contexts.values())
        assert not torch.allclose(cached[-1], plain, rtol=0, atol=1e-4)  # the cached run is not the plain one
        relcache.disable(pipe)
        assert _instance_attributes(pipe.transformer) == before
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for _ in range(2):
                torch.testing.assert_close(_latents(pipe, STEPS), plain, rtol=0, atol=1e-6)
    finally:
        if relcache.is_enabled(pipe):
            relcache.disable(pipe)
        torch._dynamo.reset()
