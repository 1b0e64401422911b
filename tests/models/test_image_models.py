"""Every method through each supported model's own diffusers pipeline, built tiny and offline (``families``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from families import CASES, STEPS, Case, generate, generate_with_stats  # noqa: E402

import relcache  # noqa: E402
from relcache import FORA, RFC, TaylorSeer  # noqa: E402


@pytest.fixture(scope="module", params=list(CASES))
def built(request: pytest.FixtureRequest) -> tuple[Case, Any, np.ndarray]:
    """(case, pipeline, uncached output) for each model, built once."""
    case = CASES[request.param]
    pipe = case.build()
    return case, pipe, generate(pipe, case)


EXPECTED_MODULES = {
    "flux": ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    + [f"single_transformer_blocks.{i}.{a}" for i in range(2) for a in ("proj_mlp", "attn")],
    "sd3": ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.0.ff",
            "transformer_blocks.0.ff_context", "transformer_blocks.1.attn", "transformer_blocks.1.ff"],
    "pixart": [f"transformer_blocks.{i}.{a}" for i in range(2) for a in ("attn1", "attn2", "ff")],
    "hunyuan_video": ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    + [f"single_transformer_blocks.{i}.{a}" for i in range(2) for a in ("proj_mlp", "attn")],
    "wan": [f"blocks.{i}.{a}" for i in range(2) for a in ("attn1", "attn2", "ffn")],
}


def test_adapters_list_modules_in_execution_order_with_matching_inputs(built):
    """Each cached module runs once per call, in the listed order, and its input pairs with its output."""
    case, pipe, _ = built
    name = next(k for k, v in CASES.items() if v is case)
    relcache.enable(pipe, FORA(1, 1))
    specs = list(vars(pipe.transformer)["_relcache"].modules)
    relcache.disable(pipe)
    assert [s.name for s in specs] == EXPECTED_MODULES[name]
    calls: list[str] = []
    handles = []
    for spec in specs:
        def check(module, args, kwargs, out, spec=spec):
            inps = spec.input_of(args, kwargs)
            inps, outs = (inps, out) if isinstance(inps, tuple) else ((inps,), (out,))
            assert len(inps) == len(outs), spec.name
            for i, o in zip(inps, outs, strict=True):  # same batch and tokens: the stream's own input
                assert i.shape[:-1] == o.shape[:-1], spec.name
            calls.append(spec.name)
        handles.append(spec.module.register_forward_hook(check, with_kwargs=True))
    try:
        generate(pipe, case, steps=1)
    finally:
        for h in handles:
            h.remove()
    assert calls == [s.name for s in specs] * len(case.contexts)


EXACT = [FORA(1, 1), TaylorSeer(1, 2, 1), RFC(threshold=0.0), RFC(target_nfc=STEPS)]


@pytest.mark.parametrize("config", EXACT, ids=lambda c: c.label)
def test_every_step_full_equals_uncached(built, config):
    case, pipe, ref = built
    with relcache.cached(pipe, config):
        out, st = generate_with_stats(pipe, case)
    assert (out == ref).all()
    assert st.nfc == STEPS and st.num_steps == STEPS and st.flops_fraction == 1.0
    assert tuple(st.contexts) == case.contexts
    assert all(c.full_steps == list(range(STEPS)) for c in st.contexts.values())


@pytest.mark.parametrize(
    "config", [FORA(3), TaylorSeer(3), RFC(threshold=0.3), RFC(target_nfc=4)], ids=lambda c: c.label
)
def test_cached_generation_counts_and_is_finite(built, config):
    case, pipe, ref = built
    with relcache.cached(pipe, config):
        out, st = generate_with_stats(pipe, case)
    assert tuple(st.contexts) == case.contexts
    assert out.shape == ref.shape and np.isfinite(out).all() and not (out == ref).all()
    for ctx in st.contexts.values():
        assert ctx.num_steps == STEPS and ctx.full_steps[:2] == [0, 1]  # warm-up
        if config.label.startswith(("FORA", "TaylorSeer")):  # Interval(3, warmup=2) over 8 steps, hand-counted
            assert ctx.full_steps == [0, 1, 4, 7] and ctx.flops_fraction == pytest.approx(4 / STEPS)
        elif "NFC" in config.label:
            assert abs(ctx.nfc - 4) <= 1
        else:
            assert 2 < ctx.nfc < STEPS
        assert ctx.flops_fraction == pytest.approx(ctx.executed_flops / ctx.full_flops) and ctx.flops_fraction < 1


def test_stats_after_the_call():
    """``relcache.stats(pipe)`` after a FluxPipeline call reports that call (the pipeline ends by resetting hooks)."""
    case = CASES["flux"]
    pipe = case.build()
    with relcache.cached(pipe, FORA(3)):
        generate(pipe, case)
        assert relcache.stats(pipe).full_steps == [0, 1, 4, 7]


def test_unsupported_model_lists_these_models():
    with pytest.raises(relcache.UnsupportedModelError) as err:
        relcache.enable(torch.nn.Linear(2, 2), FORA())
    for cls in ("FluxTransformer2DModel", "HunyuanVideoTransformer3DModel", "PixArtTransformer2DModel",
                "SD3Transformer2DModel", "WanTransformer3DModel"):
        assert cls in str(err.value)
    assert "docs/custom-models.md" in str(err.value)
