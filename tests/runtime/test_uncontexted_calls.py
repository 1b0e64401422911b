"""Pipelines that run true CFG as two transformer calls per step without ``cache_context`` (Lumina2, Cosmos, Chroma,
FLUX.1 Kontext in diffusers 0.42): the two calls of a step get contexts of their own, ``"default"`` and
``"default.2"`` (``runtime/uncontexted.py``, ``UncontextedCalls``), instead of counting as two steps of one context."""

from __future__ import annotations

import warnings

import diffusers
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import tiny_dit  # noqa: E402
from families import (  # noqa: E402
    STEPS,
    LoopPipeline,
    generate,
    generate_with_stats,
    ids_2d,
    lumina2_pipe,
    no_kwargs,
    randn,
)

import relcache  # noqa: E402
from relcache import FORA, RFC  # noqa: E402
from relcache.runtime.uncontexted import UncontextedCalls  # noqa: E402


class _Case:
    kwargs = staticmethod(no_kwargs)


def lumina2_cfg() -> LoopPipeline:
    """Lumina2 (no CacheMixin) with the negative prompt as a second call per step on the same latents."""
    model = lumina2_pipe().transformer  # the contract suite's tiny Lumina2
    texts = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=5)}
    mask = torch.ones(1, 6, dtype=torch.bool)
    return LoopPipeline(model, lambda x, t, ctx: dict(hidden_states=x, timestep=t / 1000,
                                                      encoder_hidden_states=texts[ctx], encoder_attention_mask=mask),
                        (1, 4, 8, 8), ("cond", "uncond"))


def flux_true_cfg() -> LoopPipeline:
    """FLUX.1 (CacheMixin) called as FLUX.1 Kontext's pipeline does with true CFG: no ``cache_context``."""
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    texts = {"cond": randn(1, 6, 16), "uncond": randn(1, 6, 16, seed=5)}
    pooled = randn(1, 16, seed=2)
    return LoopPipeline(model, lambda x, t, ctx: dict(
        hidden_states=x, encoder_hidden_states=texts[ctx], pooled_projections=pooled, timestep=t / 1000,
        img_ids=ids_2d(4, 4), txt_ids=torch.zeros(6, 3), guidance=torch.full_like(t, 2.5)), (1, 16, 4),
        ("cond", "uncond"), name_calls=False)


@pytest.mark.parametrize("build", [lumina2_cfg, flux_true_cfg], ids=["lumina2", "flux-kontext-style"])
def test_two_unnamed_calls_per_step_are_two_contexts(build):
    pipe = build()
    ref = generate(pipe, _Case)
    relcache.enable(pipe, FORA(1, 1))
    try:  # every step full: exactly the uncached output, and each context ran every step once
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "announced 8 steps but ran 16"
            out, st = generate_with_stats(pipe, _Case)
        assert np.array_equal(out, ref)
        assert sorted(st.contexts) == ["default", "default.2"]
        assert all(c.num_steps == STEPS and c.nfc == STEPS for c in st.contexts.values())
    finally:
        relcache.disable(pipe)
    relcache.enable(pipe, RFC(target_nfc=4))
    try:  # each call's budget realized in its own context, forecasts from its own outputs
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, st = generate_with_stats(pipe, _Case)
        assert [st.contexts[n].nfc for n in ("default", "default.2")] == [4, 4]
        assert np.isfinite(out).all() and not np.array_equal(out, ref)
        assert np.abs(out - ref).mean() / np.abs(ref).mean() < 0.05
    finally:
        relcache.disable(pipe)


def test_a_step_is_a_new_or_rewritten_input():
    """Same tensor, unchanged, and the same timestep (object or value): another call of the step. A new tensor, the
    same one written in place, or another timestep: a new step."""
    calls = UncontextedCalls()
    x, t = torch.zeros(2, 3), torch.ones(2)
    assert calls.name(x, t) == "default"
    assert calls.name(x, t) == "default.2"
    assert calls.name(x, t) == "default.3"
    x.add_(1)  # a loop that writes the latents in place: the next step
    assert calls.name(x, t) == "default"
    assert calls.name(x.clone(), t) == "default"
    assert calls.name(x, t) == "default"
    assert calls.name(x, t / 1) == "default.2"  # an equal timestep divided anew (FLUX.1 Kontext)
    assert calls.name(x, t + 1) == "default"  # the same latents at another timestep: a hand-made loop's step
    assert calls.name(x, 0.5) == "default"
    assert calls.name(x, 0.5) == "default.2"
    with torch.inference_mode():  # no version counter: identity and the timestep
        y, s = torch.zeros(2, 3), torch.ones(2)
    assert calls.name(y, s) == "default"
    assert calls.name(y, s) == "default.2"
    assert calls.name(y, s * 2) == "default"
    with torch.inference_mode():  # a static-buffer loop (CUDA graphs) refills the same tensors in place
        assert calls.name(y, s) == "default"
        assert calls.name(y, s) == "default.2"  # the same values: the step's second call
        y.sub_(1)
        s.fill_(0.5)
        assert calls.name(y, s) == "default"  # other values in the same timestep object: the next step
        assert calls.name(y, s) == "default.2"
        y.sub_(1)  # Heun's second call: the latents moved, the timestep's values repeat
        assert calls.name(y, s) == "default"
    assert calls.name(None, t) == "default"  # no latents found: the default context
    calls.name(x, t)
    calls.forget()  # a call raised: its retry starts the step again
    assert calls.name(x, t) == "default"


def test_meta_tensors_have_no_values_to_compare_so_each_call_is_a_step():
    """A shape-only run on the meta device (``benchmarks/cache_memory.py --parts meta`` sizes full-size models so)
    raised ``NotImplementedError`` (``aten::equal`` on meta tensors) where values would tell a repeat: under
    ``inference_mode`` on the same latents, and with an equal timestep in another tensor. Now each such call is a
    step of its own; the very same objects, unchanged, still make a repeat outside ``inference_mode``."""
    calls = UncontextedCalls()
    with torch.inference_mode():
        x, t = torch.empty(2, 3, device="meta"), torch.empty(2, device="meta")
        assert [calls.name(x, t) for _ in range(3)] == ["default"] * 3
    y = torch.empty(2, 3, device="meta")
    assert calls.name(y, torch.empty(2, device="meta")) == "default"
    assert calls.name(y, torch.empty(2, device="meta")) == "default"  # an equal-looking timestep: not comparable
    s = torch.empty(2, device="meta")
    assert calls.name(y, s) == "default"
    assert calls.name(y, s) == "default.2"  # the same objects, unchanged


def test_a_meta_model_under_inference_mode_counts_every_call_as_a_step():
    with torch.device("meta"):
        model = tiny_dit()
    relcache.enable(model, FORA(2))
    try:
        relcache.begin_generation(model, 4)
        with torch.inference_mode():
            x, t = torch.empty(2, 4, 8, 8, device="meta"), torch.full((2,), 999.0, device="meta")
            for _ in range(4):
                model(x, timestep=t, class_labels=torch.tensor([1, 2], device="meta"))
        st = relcache.stats(model)
        assert (st.num_steps, st.full_steps) == (4, list(FORA(2).schedule.full_steps(4)))  # every call a step
    finally:
        relcache.disable(model)


def test_the_budget_is_each_contexts_and_nfc_counts_the_steps_full_in_either():
    """True CFG as two calls per step: each call context keeps its own budget of 5, and here they choose different
    late steps, so ``nfc`` (steps full in either) reads 6 where the budget named 5 (found by review: the README said
    the realized NFC equals the budget); ``nfc_per_context`` is the budget's count, and bench's NFC column."""
    model = tiny_dit()
    relcache.enable(model, RFC(target_nfc=5))
    try:
        relcache.begin_generation(model, 16)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for i in range(16):
                t = torch.tensor([999 - 60 * i])
                c = model(x, timestep=t, class_labels=torch.tensor([3])).sample
                u = model(x, timestep=t, class_labels=torch.tensor([999])).sample
                x = x - 0.05 * (u + 6.0 * (c - u))
        st = relcache.stats(model)
    finally:
        relcache.disable(model)
    per = {name: c.full_steps for name, c in st.contexts.items()}
    assert sorted(per) == ["default", "default.2"] and all(len(steps) == 5 for steps in per.values())
    assert per["default"] != per["default.2"]  # otherwise this case shows nothing
    assert st.full_steps == sorted(set(per["default"]) | set(per["default.2"])) and st.nfc == len(st.full_steps) > 5
    assert st.nfc_per_context == 5


def test_begin_generation_starts_a_step_even_on_the_previous_calls_latents_and_timestep():
    """A hand-written loop that begins a generation from the latents and timestep its previous generation's last call
    got (a one-step probe, then the real run) had its first call read as that step's second call: the generation
    split into "default.2" (step 0) and "default" (the rest), RFC's schedule shifted by one step and its NFC and
    outputs changed. ``begin_generation`` now starts a step."""
    model = tiny_dit()
    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    t = torch.full((2,), 999)

    def loop(steps: int) -> list[torch.Tensor]:
        relcache.begin_generation(model, steps)
        outs, xi = [], x
        with torch.no_grad():
            for i in range(steps):
                outs.append(model(xi, timestep=t if i == 0 else torch.full((2,), 999 - 90 * i), class_labels=y).sample)
                xi = xi - 0.05 * outs[-1]
        return outs

    relcache.enable(model, RFC(threshold=0.3))
    try:
        reference = loop(10)
        want = relcache.stats(model).contexts["default"].full_steps
        loop(1)  # the probe: its one call gets x and t, as the next generation's first call will
        got = loop(10)
        st = relcache.stats(model)
    finally:
        relcache.disable(model)
    assert list(st.contexts) == ["default"] and st.contexts["default"].full_steps == want
    for a, b in zip(reference, got, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_static_buffer_loop_under_inference_mode_caches_as_under_no_grad():
    """Latents and timestep updated in place, as CUDA graphs need: under ``inference_mode`` (no version counter)
    each step was taken for another call of the first step, so every call got a context of its own and nothing was
    cached. FORA(3) over 8 steps is full at 0, 1, 4, 7, as under ``no_grad``, with one context, equal outputs."""
    def loop(mode: type) -> tuple[torch.Tensor, relcache.CacheStats]:
        model = tiny_dit()
        relcache.enable(model, FORA(3))
        try:
            relcache.begin_generation(model, 8)
            with mode():
                x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
                y, t = torch.tensor([1, 7]), torch.zeros(2, dtype=torch.long)
                for i in range(8):
                    t.fill_(999 - 100 * i)
                    x.sub_(0.05 * model(x, timestep=t, class_labels=y).sample)
                return x.clone(), relcache.stats(model)
        finally:
            relcache.disable(model)

    ref, plain = loop(torch.no_grad)
    got, st = loop(torch.inference_mode)
    assert plain.full_steps == st.full_steps == [0, 1, 4, 7] and list(st.contexts) == ["default"]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_many_calls_on_the_same_inputs_are_warned_about_once():
    """A fourth call of one step on the very same latents and timestep (more than the pipelines we know make) is
    warned about, once: each such call gets a context and caches of its own (a loop timing one step grew FLUX's caches
    by 6 GiB a call on an H200, 2026-12-04). Three calls, as a pipeline with two guidance calls makes, are not."""
    calls = UncontextedCalls()
    x, t = torch.zeros(2, 3), torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [calls.name(x, t) for _ in range(3)] == ["default", "default.2", "default.3"]
    with pytest.warns(RuntimeWarning, match="same latents tensor and timestep 4 times in a row"):
        assert calls.name(x, t) == "default.4"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calls.name(x, t) == "default.5"  # said once
        x.add_(1)
        assert [calls.name(x, t) for _ in range(4)][-1] == "default.4"  # nor again at a later step


def test_a_context_the_pipeline_stops_part_way_is_warned_of_once():
    """Found by review: diffusers' Lumina2Pipeline with ``cfg_trunc_ratio`` stops its unconditional call after the
    first steps, so that context ("default.2") ran 5 of 20 steps, 2 of them full under RFC(target_nfc=6), without a
    word, while the budget is said to hold in each context. It is said once per ``enable``, naming the context."""
    from families import _vae2d

    model = lumina2_pipe().transformer
    pipe = diffusers.Lumina2Pipeline(transformer=model, vae=_vae2d(4, shift_factor=0.1), text_encoder=None,
                                     tokenizer=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    mask = torch.ones(1, 6, dtype=torch.bool)
    kwargs = dict(prompt_embeds=randn(1, 6, 16), prompt_attention_mask=mask, negative_prompt_embeds=randn(1, 6, 16,
                  seed=2), negative_prompt_attention_mask=mask, height=16, width=16, num_inference_steps=20,
                  guidance_scale=4.0, output_type="latent")
    with relcache.cached(pipe, RFC(target_nfc=6)):
        with pytest.warns(RuntimeWarning, match=r"of this generation's 20 steps, call context 'default.2' ran 5 "
                                                r"\(2 of them full\).*cfg_trunc_ratio") as got:
            pipe(**kwargs, cfg_trunc_ratio=0.25, generator=torch.manual_seed(0))
        assert len([w for w in got if "call context" in str(w.message)]) == 1
        st = relcache.stats(pipe)
        assert (st.contexts["default"].nfc, st.contexts["default.2"].num_steps) == (6, 5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per enable; and not where both contexts run every step
            pipe(**kwargs, cfg_trunc_ratio=0.25, generator=torch.manual_seed(0))
    with relcache.cached(pipe, RFC(target_nfc=6)), warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(**kwargs, generator=torch.manual_seed(0))
        assert [c.nfc for c in relcache.stats(pipe).contexts.values()] == [6, 6]
