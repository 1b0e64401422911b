"""Caching alongside torch.compile, CPU offloading, fused LoRA weights and a change of resolution between calls."""

from __future__ import annotations

import logging

import pytest
import torch
from custom_dit import ADAPTER, TinyDiT, sample

import relcache
from relcache import FORA, RFC, TaylorSeer
from relcache.models.custom import CustomAdapter

# -- torch.compile ---------------------------------------------------------------------------------------------------
COMPILE_STEPS = 10


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def compiled_runs() -> dict[str, object]:
    """The hand-written DiT of test_custom_model with RFC enabled, sampled eagerly, then twice through
    torch.compile, counting the graphs compiled after each step and dynamo's warnings.

    The backend only counts: dynamo's tracing, guards and recompilations are what interact with the hooks, and
    code generation (inductor) would take minutes on this CPU without telling more.
    """
    torch._dynamo.reset()
    graphs: list[object] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = TinyDiT(depth=2).eval()
    relcache.enable(model, RFC(threshold=0.3), adapter=CustomAdapter(**ADAPTER))
    eager = sample(model, steps=COMPILE_STEPS)
    eager_steps = relcache.stats(model).full_steps
    compiled = torch.compile(model, backend=counting_backend)
    per_step: list[int] = []
    records = _Records()
    logging.getLogger("torch._dynamo").addHandler(records)
    try:
        first = sample(compiled, steps=COMPILE_STEPS, after_step=lambda: per_step.append(len(graphs)))
        first_steps = relcache.stats(model).full_steps
        second = sample(compiled, steps=COMPILE_STEPS)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(records)
        relcache_stats = relcache.stats(model)
        relcache.disable(model)
        torch._dynamo.reset()
    return dict(eager=eager, first=first, second=second, eager_steps=eager_steps, first_steps=first_steps,
                second_steps=relcache_stats.full_steps, graphs_per_step=per_step, graphs_after=len(graphs),
                limit_hits=[m for m in records.messages if "recompile_limit" in m])


def test_compile_gives_the_eager_result(compiled_runs):
    r = compiled_runs
    assert r["eager_steps"] == r["first_steps"] == r["second_steps"]
    assert 2 < len(r["eager_steps"]) < COMPILE_STEPS  # some steps were cached
    # compiler tolerance: the compiled forecast rounds otherwise (RFE's Gram form); outputs reach 4.7, where a float32
    # ulp is 4.8e-7, and cached steps differed by up to 1.9e-6 (4 ulps) on one CPU, past an atol of 1e-6
    for a, b, c in zip(r["eager"], r["first"], r["second"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_compile_does_not_recompile_every_step(compiled_runs):
    """Graphs are compiled for the first few steps (full, then cached paths) and never again, not once per step."""
    per_step = compiled_runs["graphs_per_step"]
    assert not compiled_runs["limit_hits"]  # no frame fell back to eager after too many recompilations
    assert per_step[-1] == per_step[5], per_step  # all paths are seen by the first full step after a cached one
    assert compiled_runs["graphs_after"] == per_step[-1]  # nothing new in a second generation


def test_the_compiled_object_stands_for_the_model():
    """enable, begin_generation, stats and disable on ``torch.compile(model)`` act on the model: target_nfc needs
    the number of steps, so the loop below only runs if begin_generation on the wrapper reached it."""
    torch.manual_seed(0)
    model = TinyDiT(depth=1).eval()
    compiled = torch.compile(model, backend="eager")  # compiles lazily: never called here
    relcache.enable(compiled, RFC(target_nfc=3), adapter=CustomAdapter(**ADAPTER))
    assert relcache.is_enabled(model)
    relcache.begin_generation(compiled, 8)
    sample(model, steps=8, begin=False)
    assert relcache.stats(compiled).nfc == 3
    relcache.disable(compiled)
    assert not relcache.is_enabled(model)


# -- the pipelines of families.py -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tm():
    """tests/families.py (the tiny pipelines), which needs transformers."""
    pytest.importorskip("transformers")
    import families

    return families


def _cached(tm, case, config, prepare=None, enable_first=True):
    pipe = case.build()
    if not enable_first and prepare:
        prepare(pipe)
    relcache.enable(pipe, config)
    if enable_first and prepare:
        prepare(pipe)
    out, st = tm.generate_with_stats(pipe, case)
    return pipe, out, st


@pytest.mark.parametrize("enable_first", [
    pytest.param(True, id="enable-then-offload"),
    pytest.param(False, id="offload-then-enable"),
])
def test_model_cpu_offload_keeps_cache_state(tm, enable_first):
    """accelerate's offload hooks (re-applied by the pipeline after every call) leave relcache's state intact.

    ``enable_model_cpu_offload`` refuses to guess an accelerator on a CPU-only machine, so the "device" is the CPU:
    the hooks are installed and re-installed as on a GPU, only the weights do not move.
    """
    pytest.importorskip("accelerate")
    case = tm.CASES["wan"]  # CFG as separate "cond" and "uncond" calls
    _, ref, ref_st = _cached(tm, case, TaylorSeer(3))
    pipe, out, st = _cached(tm, case, TaylorSeer(3), lambda p: p.enable_model_cpu_offload(device="cpu"), enable_first)
    assert hasattr(pipe.transformer, "_hf_hook")
    assert (out == ref).all() and st.full_steps == ref_st.full_steps == [0, 1, 4, 7]
    again, st2 = tm.generate_with_stats(pipe, case)  # offload hooks were re-applied at the end of the first call
    assert (again == ref).all() and set(st2.contexts) == {"cond", "uncond"}
    relcache.disable(pipe)
    assert (tm.generate(pipe, case) == tm.generate(case.build(), case)).all()


def test_disable_keeps_a_later_offload_hook(tm):
    """After ``disable``, a transformer offloaded after ``enable`` still goes through accelerate's hook (on a GPU,
    running without it would find the weights on the CPU)."""
    pytest.importorskip("accelerate")
    pipe = tm.CASES["flux"].build()
    relcache.enable(pipe, FORA(3))
    pipe.enable_model_cpu_offload(device="cpu")
    relcache.disable(pipe)
    assert "forward" in vars(pipe.transformer)  # accelerate's wrapper, not the class's forward


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading(tm, offload_type):
    """diffusers' group offloading registers its hooks in the same registry as relcache's."""
    case = tm.CASES["flux"]
    cpu = torch.device("cpu")

    def offload(p):
        p.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type,
                                           num_blocks_per_group=1)

    plain = tm.generate(case.build(), case)
    _, ref, _ = _cached(tm, case, TaylorSeer(3))
    for enable_first in (True, False):
        pipe, exact, _ = _cached(tm, case, FORA(1, 1), offload, enable_first)
        assert (exact == plain).all()
        relcache.disable(pipe)
        relcache.enable(pipe, TaylorSeer(3))
        out, st = tm.generate_with_stats(pipe, case)
        assert (out == ref).all() and st.full_steps == [0, 1, 4, 7]
        relcache.disable(pipe)
        assert any("group_offloading" in m._diffusers_hook.hooks  # group offloading's hooks stay
                   for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook"))
        assert (tm.generate(pipe, case) == plain).all()


# -- LoRA -------------------------------------------------------------------------------------------------------------
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "ff.net.2"]  # proj_mlp is itself a cached module


def _fuse_lora(pipe) -> None:
    from peft import LoraConfig

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)  # random, not 0
    pipe.transformer.add_adapter(config)
    pipe.transformer.fuse_lora()


@pytest.mark.parametrize("enable_first", [True, False], ids=["enable-then-lora", "lora-then-enable"])
def test_fused_lora(tm, enable_first):
    """LoRA layers injected and fused before or after enabling: full steps give the fused model's output exactly."""
    pytest.importorskip("peft")
    case = tm.CASES["flux"]
    fused_pipe = case.build()
    _fuse_lora(fused_pipe)
    fused = tm.generate(fused_pipe, case)
    assert not (fused == tm.generate(case.build(), case)).all()  # the LoRA changed the model
    relcache.enable(fused_pipe, TaylorSeer(3))
    ref_cached, _ = tm.generate_with_stats(fused_pipe, case)
    relcache.disable(fused_pipe)

    pipe, exact, st = _cached(tm, case, FORA(1, 1), _fuse_lora, enable_first)
    assert (exact == fused).all() and st.nfc == 8
    relcache.disable(pipe)
    relcache.enable(pipe, TaylorSeer(3))
    out, st = tm.generate_with_stats(pipe, case)
    assert (out == ref_cached).all() and st.full_steps == [0, 1, 4, 7]
    relcache.disable(pipe)
    assert (tm.generate(pipe, case) == fused).all()


# -- resolution -------------------------------------------------------------------------------------------------------
def test_two_resolutions_between_calls(tm):
    """A second call at another resolution starts afresh: same result as a pipeline that only ran that one."""
    case = tm.CASES["flux"]
    pipe = case.build()
    relcache.enable(pipe, TaylorSeer(3))
    kw = dict(num_inference_steps=8, output_type="np")
    small = pipe(**case.kwargs(), generator=torch.manual_seed(0), **kw).images
    large = pipe(**tm.flux_kwargs(size=32), generator=torch.manual_seed(0), **kw).images
    relcache.disable(pipe)
    fresh = case.build()
    with relcache.cached(fresh, TaylorSeer(3)):
        alone = fresh(**tm.flux_kwargs(size=32), generator=torch.manual_seed(0), **kw).images
    assert small.shape == (1, 16, 16, 3) and large.shape == (1, 32, 32, 3)
    assert (large == alone).all()
    with relcache.cached(pipe, FORA(1, 1)):
        exact = pipe(**tm.flux_kwargs(size=32), generator=torch.manual_seed(0), **kw).images
    assert (exact == fresh(**tm.flux_kwargs(size=32), generator=torch.manual_seed(0), **kw).images).all()
