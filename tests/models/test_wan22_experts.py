"""Wan 2.2's two-expert pipelines (``transformer`` for high noise, ``transformer_2`` for low noise): the adapter side.

The adapter names both experts in the order a generation first calls them, and each expert's listed modules run
in order at the steps that expert serves. The runtime (docs/spec.md, "Several transformers"): one ``enable`` covers
both experts, with one generation, one step clock and one NFC budget over both; each expert forecasts from its own
caches only, and the switch step is full.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402
from families import (  # noqa: E402
    CASES,
    WAN_TINY,
    LoopOutput,
    LoopPipeline,
    generate,
    wan_like_pipe,
    wan_pipe,
    wan_vace_pipe,
)
from torch import nn  # noqa: E402

import relcache  # noqa: E402
from relcache.models import find_adapter  # noqa: E402
from relcache.models.base import first_tensor_input as first_tensor  # noqa: E402


def wan22_pipe(**second: Any) -> WanPipeline:
    """The tiny Wan pipeline with a second expert of the same config (but for ``second``) and the switch half-way
    (boundary_ratio)."""
    one = wan_pipe()
    torch.manual_seed(1)
    expert = WanTransformer3DModel(**{**WAN_TINY, **second}, cross_attn_norm=True).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=one.vae, scheduler=one.scheduler,
                       transformer=one.transformer, transformer_2=expert, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_adapter_lists_both_experts_in_the_order_a_generation_runs_them():
    pipe = wan22_pipe()
    adapter = find_adapter(pipe.transformer)
    assert find_adapter(pipe.transformer_2) is adapter
    experts = adapter.pipeline_transformers(pipe)
    assert [name for name, _ in experts] == ["transformer", "transformer_2"]
    assert experts[0][1] is pipe.transformer and experts[1][1] is pipe.transformer_2
    runs: list[str] = []
    handles = [model.register_forward_pre_hook(lambda *_, name=name: runs.append(name)) for name, model in experts]
    per_expert = {name: [m.name for m in adapter.cached_modules(model)] for name, model in experts}
    calls: dict[str, list[list[str]]] = {name: [] for name, _ in experts}
    for name, model in experts:
        handles.append(model.register_forward_pre_hook(lambda *_, name=name: calls[name].append([])))
        for spec in adapter.cached_modules(model):
            handles.append(spec.module.register_forward_pre_hook(
                lambda *_, name=name, spec=spec: calls[name][-1].append(spec.name)))
    try:
        generate(pipe, CASES["wan"], steps=6)
    finally:
        for h in handles:
            h.remove()
    first_low = runs.index("transformer_2")  # cond and uncond calls per step; the switch happens once
    assert 0 < first_low < len(runs) and set(runs[:first_low]) == {"transformer"}
    assert set(runs[first_low:]) == {"transformer_2"} and len(runs) == 12
    for name in per_expert:
        assert calls[name] and all(c == per_expert[name] for c in calls[name])


def test_a_single_expert_pipeline_lists_one():
    pipe = wan_pipe()  # Wan 2.1: transformer_2 is None
    assert [name for name, _ in find_adapter(pipe.transformer).pipeline_transformers(pipe)] == ["transformer"]


# -- the runtime: one enable, one generation, one step clock and one budget over both experts ----------------------
STEPS = 8  # boundary_ratio 0.5 with 8 flow-matching steps: steps 0-3 high noise (transformer), 4-7 low noise
SWITCH = 4


def switch_step(steps: int) -> int:
    """The first step the low-noise expert serves, from the scheduler's timesteps and the pipeline's boundary."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    return next(i for i, t in enumerate(sched.timesteps) if t < 0.5 * sched.config.num_train_timesteps)


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return wan22_pipe()


@pytest.fixture(scope="module")
def uncached(pipe: WanPipeline) -> np.ndarray:
    return generate(pipe, CASES["wan"], steps=STEPS)


@pytest.fixture
def session_of(pipe: WanPipeline) -> Iterator[Callable[[relcache.CacheConfig], None]]:
    """``session_of(config)`` enables ``config`` on the pipeline for the test; disabled after it."""
    def on(config: relcache.CacheConfig) -> None:
        relcache.enable(pipe, config)

    yield on
    for model in (pipe.transformer, pipe.transformer_2):
        if relcache.is_enabled(model):
            relcache.disable(model)


def run(pipe: WanPipeline) -> tuple[np.ndarray, relcache.CacheStats]:
    """Output and stats of one generation, no warning allowed (a step count other than announced would warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generate(pipe, CASES["wan"], steps=STEPS)
    return out, relcache.stats(pipe)


def test_the_switch_step_is_the_one_the_pipeline_switches_at():
    assert switch_step(STEPS) == SWITCH


def test_one_enable_caches_both_experts(pipe, session_of):
    session_of(relcache.FORA(interval=3, warmup=1))
    assert relcache.is_enabled(pipe.transformer) and relcache.is_enabled(pipe.transformer_2)
    names = {name: [f"{name}.{m.name}" for m in find_adapter(model).cached_modules(model)]
             for name, model in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2))}
    _, st = run(pipe)
    assert list(st.modules) == names["transformer"] + names["transformer_2"]
    assert list(st.experts) == ["transformer", "transformer_2"]
    for name, expert in st.experts.items():
        assert list(expert.modules) == names[name]
        assert 0 < expert.flops_fraction < 1  # each expert forecast some of its modules' calls


def test_every_step_full_equals_each_expert_uncached_and_disable_restores(pipe, uncached, session_of):
    session_of(relcache.RFC(target_nfc=STEPS))
    out, st = run(pipe)
    assert st.full_steps == list(range(STEPS)) and np.array_equal(out, uncached)
    for name, served in (("transformer", range(SWITCH)), ("transformer_2", range(SWITCH, STEPS))):
        assert st.experts[name].full_steps == list(served) and st.experts[name].flops_fraction == 1.0
    relcache.disable(pipe)
    assert not relcache.is_enabled(pipe.transformer_2)
    assert np.array_equal(generate(pipe, CASES["wan"], steps=STEPS), uncached)


def test_steps_keep_counting_across_the_switch_and_its_step_is_full(pipe, session_of):
    """FORA every 3 steps from step 0 plans 0, 3, 6; the switch at 4 is full as well."""
    config = relcache.FORA(interval=3, warmup=1)
    plan = config.schedule.full_steps(STEPS)
    assert plan == [0, 3, 6] and SWITCH not in plan
    session_of(config)
    _, st = run(pipe)
    assert st.num_steps == STEPS and st.full_steps == [0, 3, SWITCH, 6]
    for ctx in ("cond", "uncond"):
        assert st.contexts[ctx].full_steps == [0, 3, SWITCH, 6] and st.contexts[ctx].num_steps == STEPS
    high, low = st.experts["transformer"], st.experts["transformer_2"]
    assert (high.num_steps, high.full_steps) == (SWITCH, [0, 3])
    assert (low.num_steps, low.full_steps) == (STEPS - SWITCH, [SWITCH, 6])
    assert high.nfc + low.nfc == st.nfc


def _outputs(pipe: WanPipeline) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    """Every cached module's "cond" output per step of the expert serving it (what the block received: the real
    output or the forecast), and the hooks to remove."""
    adapter = find_adapter(pipe.transformer)
    outs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in ("transformer", "transformer_2"):
        for spec in adapter.cached_modules(getattr(pipe, name)):
            key = f"{name}.{spec.name}"
            outs[key] = []
            handles.append(spec.module.register_forward_hook(
                lambda _m, _a, out, key=key: outs[key].append((out[0] if isinstance(out, tuple) else out).clone())))
    return outs, handles


def test_each_expert_forecasts_from_its_own_history_only(pipe, session_of):
    """FORA reuses a module's output of the latest full step. After the switch, the low-noise expert's cached steps
    reuse its own output of the switch step; before it, the high-noise expert's reuse its own; and at no step do the
    caches hold the other expert's states."""
    session_of(relcache.FORA(interval=3, warmup=1))
    outs, handles = _outputs(pipe)
    held: list[dict[str, set[str]]] = []  # after each transformer call: per context, the experts its caches hold
    session = vars(pipe.transformer)["_relcache"]
    names = [m.name for m in session.cached_modules]

    def note(*_: Any) -> None:
        held.append({name: {names[idx].split(".")[0] for idx, r in c.caches.records.items() if r.states}
                     for name, c in session.contexts.items()})

    handles += [m.register_forward_hook(note) for m in (pipe.transformer, pipe.transformer_2)]
    try:
        _, st = run(pipe)
    finally:
        for h in handles:
            h.remove()
    assert st.full_steps == [0, 3, SWITCH, 6]
    for key, per_call in outs.items():
        cond = per_call[::2]  # "cond" then "uncond" at each step
        if key.startswith("transformer_2."):
            assert len(cond) == STEPS - SWITCH  # steps 4 (full), 5 (reuse of 4), 6 (full), 7 (reuse of 6)
            assert torch.equal(cond[1], cond[0]) and torch.equal(cond[3], cond[2])
            assert not torch.equal(cond[2], cond[0])
        else:
            assert len(cond) == SWITCH  # steps 0 (full), 1, 2 (reuse of 0), 3 (full)
            assert torch.equal(cond[1], cond[0]) and torch.equal(cond[2], cond[0])
            assert not torch.equal(cond[3], cond[0])
    high, low = {"transformer"}, {"transformer_2"}
    assert held[0] == {"cond": high} and held[1: 2 * SWITCH] == [{"cond": high, "uncond": high}] * (2 * SWITCH - 1)
    assert held[2 * SWITCH] == {"cond": low, "uncond": high}  # the switch step's "cond" call ran; "uncond" is next
    assert held[2 * SWITCH + 1:-2] == [{"cond": low, "uncond": low}] * (2 * (STEPS - SWITCH) - 3)
    # each context's caches go once its call of the last step returned (the VAE decodes without them)
    assert held[-2:] == [{"cond": set(), "uncond": low}, {"cond": set(), "uncond": set()}]


@pytest.mark.parametrize("target", [3, 4, 5, 6])
def test_rfc_target_nfc_counts_full_steps_of_both_experts(pipe, session_of, target):
    session_of(relcache.RFC(target_nfc=target))
    _, st = run(pipe)
    assert st.nfc == target and SWITCH in st.full_steps and st.full_steps[:2] == [0, 1]
    assert st.experts["transformer"].nfc + st.experts["transformer_2"].nfc == target
    for ctx in st.contexts.values():
        assert ctx.nfc == target and SWITCH in ctx.full_steps


def test_rfc_with_a_budget_spent_before_the_switch_still_computes_it(pipe, session_of):
    """(choice) The switch step is full even when the warm-up spent the whole budget: the low-noise expert has
    nothing of its own to forecast from. target_nfc 2 (= warmup) realizes 3."""
    session_of(relcache.RFC(target_nfc=2))
    _, st = run(pipe)
    assert st.full_steps == [0, 1, SWITCH]


def test_rcs_input_history_restarts_at_the_switch(pipe, session_of):
    """No input error is measured at the switch (forced full, nothing to forecast the new expert's input from); the
    next step's error is that of reusing the switch step's input (order 0: one record since the restart), by hand."""
    session_of(relcache.RFC(threshold=100.0, order=2))  # a threshold never reached: full steps 0, 1 and the switch
    probe = pipe.transformer_2.blocks[0].attn1  # the low-noise expert's first cached module
    inputs: list[torch.Tensor] = []
    handle = probe.register_forward_pre_hook(
        lambda _m, args, kwargs: inputs.append(first_tensor(args, kwargs).clone()), with_kwargs=True)
    try:
        _, st = run(pipe)
    finally:
        handle.remove()
    assert st.full_steps == [0, 1, SWITCH]
    errors = st.contexts["cond"].input_errors
    assert set(errors) == set(range(2, STEPS)) - {SWITCH}
    at_switch, after = inputs[0], inputs[2]  # "cond" calls of steps 4 and 5
    expected = float((after - at_switch).abs().sum() / after.abs().sum())
    assert errors[SWITCH + 1] == pytest.approx(expected, rel=1e-5)


def test_an_expert_enabled_alone_is_refused_and_disable_covers_both(pipe, session_of):
    config = relcache.FORA(interval=3, warmup=1)
    relcache.enable(pipe.transformer_2, config)
    with pytest.raises(relcache.AlreadyEnabledError, match="transformer_2"):
        relcache.enable(pipe, config)
    assert not relcache.is_enabled(pipe.transformer)
    relcache.disable(pipe.transformer_2)
    relcache.enable(pipe, config)
    with pytest.raises(relcache.AlreadyEnabledError):
        relcache.enable(pipe.transformer_2, config)
    relcache.disable(pipe.transformer_2)  # the expert's session is the pipeline's: both are off
    assert not relcache.is_enabled(pipe.transformer) and not relcache.is_enabled(pipe.transformer_2)


def test_cfg_cache_drops_the_previous_experts_delta_at_the_switch(pipe, session_of):
    """CFG-Cache on the paper's schedule (window 2-8, refresh every 5: steps 2 and 7 run both halves, the others skip
    the unconditional call while a delta is usable). The switch drops the high-noise expert's delta, so step 4 runs
    its unconditional call and stores the low-noise expert's own delta, which steps 5 and 6 use."""
    cfg = relcache.CFGCache(align=False, window_steps=(2, 8), interval=5)
    session_of(dataclasses.replace(relcache.FORA(interval=3, warmup=1), cfg_cache=cfg))
    _, st = run(pipe)
    assert st.contexts["uncond"].uncond_skipped_steps == [3, 5, 6]
    assert st.experts["transformer"].contexts["uncond"].uncond_skipped_steps == [3]
    assert st.experts["transformer_2"].contexts["uncond"].uncond_skipped_steps == [5, 6]


class TwoExpertLoop(LoopPipeline):
    """``LoopPipeline`` with Wan 2.2's switch (``transformer`` while ``t >= 500``, then ``transformer_2``) and, like
    ``WanImageToVideoPipeline``, no step index in its cache contexts: the step clock is the runtime's own count."""

    def __init__(self, high: LoopPipeline, low: nn.Module) -> None:
        super().__init__(high.transformer, high.inputs, high.shape, high.contexts)
        self.transformer_2 = low.eval()

    @torch.no_grad()
    def __call__(self, num_inference_steps: int, generator: torch.Generator, output_type: str = "np",
                 **_: Any) -> Any:
        self.scheduler.set_timesteps(num_inference_steps)
        latents = torch.randn(self.shape, generator=generator)
        for t in self.scheduler.timesteps:
            model = self.transformer if t >= 500 else self.transformer_2
            preds = []
            for ctx in self.contexts:
                with model.cache_context(ctx):
                    preds.append(model(**self.inputs(latents, t.expand(1), ctx), return_dict=False)[0])
            latents = self.scheduler.step(preds[1] + 3.0 * (preds[0] - preds[1]), t, latents).prev_sample
        self.maybe_free_model_hooks()
        return LoopOutput(latents.numpy())


@pytest.mark.parametrize("family", ["wan", "wan_vace"])
def test_steps_keep_counting_where_the_pipeline_gives_no_step_index(family):
    """Wan (as its image-to-video pipeline calls it) and Wan VACE, whose pipeline holds two experts too."""
    high = wan_like_pipe("WanTransformer3DModel") if family == "wan" else wan_vace_pipe()
    low = (wan_like_pipe("WanTransformer3DModel") if family == "wan" else wan_vace_pipe()).transformer
    loop = TwoExpertLoop(high, low)
    relcache.enable(loop, relcache.FORA(interval=3, warmup=1))
    try:
        _, st = run(loop)
    finally:
        relcache.disable(loop)
    assert st.num_steps == STEPS and st.full_steps == [0, 3, SWITCH, 6]
    assert [st.experts[n].num_steps for n in ("transformer", "transformer_2")] == [SWITCH, STEPS - SWITCH]


def test_one_module_held_as_both_experts_is_one_transformer():
    one = wan_pipe()
    twice = WanPipeline(tokenizer=None, text_encoder=None, vae=one.vae, scheduler=one.scheduler,
                        transformer=one.transformer, transformer_2=one.transformer, boundary_ratio=0.5)
    twice.set_progress_bar_config(disable=True)
    relcache.enable(twice, relcache.FORA(interval=3, warmup=1))
    try:
        _, st = run(twice)
    finally:
        relcache.disable(twice)
    assert st.full_steps == [0, 3, 6] and st.experts == {} and not any(n.startswith("transformer") for n in st.modules)


def test_an_expert_that_serves_no_step_reports_none():
    """``boundary_ratio=None``: the pipeline runs ``transformer`` only; both are enabled, the second reports 0 steps."""
    pipe = wan22_pipe()
    pipe.register_to_config(boundary_ratio=None)
    relcache.enable(pipe, relcache.FORA(interval=3, warmup=1))
    try:
        _, st = run(pipe)
    finally:
        relcache.disable(pipe)
    assert st.full_steps == [0, 3, 6]
    assert st.experts["transformer"].full_steps == [0, 3, 6] and st.experts["transformer_2"].num_steps == 0
    # its FLOP fields are NaN, and say why; the expert that ran counted its own
    idle, ran = st.experts["transformer_2"], st.experts["transformer"]
    assert math.isnan(idle.flops_fraction) and idle.flops_unknown == "this expert completed no step"
    assert ran.flops_unknown is None and 0 < ran.flops_fraction < 1


def test_enabling_the_pipeline_after_its_first_expert_alone_is_refused(pipe, session_of):
    """The shared-transformer rule attaches a second pipeline to an enabled transformer; here that would leave the
    low-noise expert uncached, so it is refused."""
    config = relcache.FORA(interval=3, warmup=1)
    relcache.enable(pipe.transformer, config)
    with pytest.raises(relcache.AlreadyEnabledError, match="transformer_2"):
        relcache.enable(pipe, config)
    assert not relcache.is_enabled(pipe.transformer_2)


def test_a_deeper_second_expert_stays_within_max_cache_bytes():
    """The storage was chosen once per context, from the first expert's modules: a second expert of 4 blocks held
    26208 bytes as computed under ``max_cache_bytes=26207``. Chosen again at the switch (the first expert's caches
    are dropped there), every generation stays within the budget, and a budget of exactly the peak keeps every cache
    as computed."""
    pipe = wan22_pipe(num_layers=4)

    def run(config: relcache.CacheConfig) -> tuple[relcache.CacheStats, relcache.CacheStats]:
        with relcache.cached(pipe, config):
            first = (generate(pipe, CASES["wan"], steps=8), relcache.stats(pipe))[1]
            generate(pipe, CASES["wan"], steps=8)
            return first, relcache.stats(pipe)

    peak = run(relcache.RFC(threshold=0.0))[0].peak_cache_bytes
    for budget in (peak, peak - 1):
        for got in run(dataclasses.replace(relcache.RFC(threshold=0.0), max_cache_bytes=budget)):
            assert got.peak_cache_bytes <= budget
            storages = {ctx.cache_storage for ctx in got.contexts.values()}
            assert storages == {"as computed"} if budget == peak else len(storages) > 1


def test_one_expert_enabled_alone_counts_its_first_step_full():
    """``transformer_2`` enabled on its own first runs at the pipeline's step 4 of 8, after FORA's warm-up: nothing
    recorded yet, so every module computed there, yet the step was counted cached (found by review: full steps
    [6] and NFC 1 while the modules ran at 4 and 6). It is counted full now, and each context's full steps are the
    steps its modules ran."""
    pipe = wan22_pipe()
    ran: list[int] = []
    step = [0]
    inner = pipe.transformer_2.blocks[0].ffn.net[0]  # inside the cached module: runs only where it computes
    inner.register_forward_hook(lambda *_: ran.append(step[0]))

    def count(_pipe, i, _t, kwargs):
        step[0] = i + 1
        return kwargs

    with relcache.cached(pipe.transformer_2, relcache.FORA(interval=3, warmup=1)), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it runs 4 of the 8 steps the scheduler announced
        pipe(**CASES["wan"].kwargs(), num_inference_steps=8, generator=torch.manual_seed(0), output_type="latent",
             callback_on_step_end=count)
        st = relcache.stats(pipe.transformer_2)
    assert sorted(set(ran)) == [4, 6]
    assert all(c.full_steps == [4, 6] for c in st.contexts.values()) and st.nfc == 2
