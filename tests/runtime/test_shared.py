"""DiT's per-block timestep-and-class embeddings, computed once per call where the copies are equal (exact)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_loop, tiny_dit

import relcache
from relcache import FORA, RFC, TaylorSeer
from relcache.models.dit import DiTAdapter
from relcache.runtime import flop_counter

LAYERS = 4


class _NoSharing(DiTAdapter):
    def shared_modules(self, model):
        return []


def embedding_runs(model: torch.nn.Module) -> list[int]:
    """Counts each computed embedding (the sinusoidal projection runs inside every computed copy)."""
    calls: list[int] = []
    for i, block in enumerate(model.transformer_blocks):
        block.norm1.emb.time_proj.register_forward_hook(lambda *_, i=i: calls.append(i))
    return calls


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    return torch.cat([x, x]), torch.tensor([3, 1000])


@pytest.mark.parametrize("config", [FORA(1, 1), TaylorSeer(3), RFC(target_nfc=6)], ids=lambda c: c.label)
def test_tied_embeddings_computed_once_per_call_and_outputs_bit_identical(config):
    model = tiny_dit(layers=LAYERS)  # copies tied, like a converted checkpoint
    x, labels = inputs()
    calls = embedding_runs(model)
    ref = run_loop(model, x, labels)
    assert len(calls) == 12 * (LAYERS + 1)  # every block, and block 0's again for the final layer
    calls.clear()
    with relcache.cached(model, config):
        out = run_loop(model, x, labels)
    assert calls == [*range(LAYERS), 0] + [0] * 11  # once per call, after the first (FLOPs measured as diffusers)
    calls.clear()
    if config.label == FORA(1, 1).label:  # every step full: exactly the uncached model
        assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    else:  # a cached run: the same as with the copies computed one by one
        with relcache.cached(model, config, adapter=_NoSharing()):
            plain = run_loop(model, x, labels)
        assert len(calls) == 12 * (LAYERS + 1)  # nothing shared
        assert all(torch.equal(a, b) for a, b in zip(out, plain, strict=True))


def test_untied_copies_are_each_computed():
    model = tiny_dit(layers=LAYERS)
    with torch.no_grad():  # random weights: every copy differs
        for block in model.transformer_blocks:
            block.norm1.emb.timestep_embedder.linear_1.weight.normal_()
    x, labels = inputs()
    ref = run_loop(model, x, labels)
    calls = embedding_runs(model)
    with relcache.cached(model, FORA(1, 1)):
        out = run_loop(model, x, labels)
    # each copy once; after the first call, the final layer's second call of block 0 is shared
    assert calls == [*range(LAYERS), 0] + list(range(LAYERS)) * 11
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


@pytest.fixture
def tied() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[int]]:
    """A tiny DiT with tied embedding copies, its inputs, and the list of copies computed."""
    model = tiny_dit(layers=LAYERS)  # copies tied, like a converted checkpoint
    return model, *inputs(), embedding_runs(model)


@pytest.mark.parametrize("new_generation", [True, False], ids=["between generations", "within a generation"])
def test_a_copy_changed_after_enable_is_computed_again(tied, new_generation):
    model, x, labels, calls = tied

    def step(t: int) -> torch.Tensor:
        with torch.no_grad():
            return model(x, timestep=torch.full((2,), t), class_labels=labels).sample

    with relcache.cached(model, FORA(1, 1)):
        relcache.begin_generation(model, 5)
        for t in (999, 800, 600):
            step(t)
        assert calls == [*range(LAYERS), 0, 0, 0]
        calls.clear()
        with torch.no_grad():  # in place, as an optimizer step or load_state_dict would
            model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.bias.add_(0.5)
        if new_generation:
            relcache.begin_generation(model, 5)
        out = [step(t) for t in (400, 200)]
        assert calls == [0, 2, 0, 2]
    ref = [step(t) for t in (400, 200)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_no_sharing_with_autograd_on(tied):
    model, x, labels, calls = tied
    with relcache.cached(model, FORA(1, 1)):
        relcache.begin_generation(model, 1)
        model(x, timestep=torch.full((2,), 999), class_labels=labels).sample.sum().backward()
    assert len(calls) == LAYERS + 1
    assert all(b.norm1.emb.timestep_embedder.linear_1.weight.grad is not None for b in model.transformer_blocks)


def test_hooks_removed_on_disable():
    model = tiny_dit(layers=LAYERS)  # copies tied, like a converted checkpoint
    relcache.enable(model, FORA(2))
    relcache.disable(model)
    assert all(not hasattr(b.norm1.emb, "_diffusers_hook") and "forward" not in vars(b.norm1.emb)
               for b in model.transformer_blocks)


@pytest.mark.parametrize("config", [FORA(1, 1), TaylorSeer(3)], ids=lambda c: c.label)
def test_executed_flops_leave_out_the_shared_copies(config):
    """Executed FLOPs match an outer counter of what actually ran; full FLOPs are the plain model's."""
    model = tiny_dit(layers=LAYERS)
    x, labels = inputs()
    with flop_counter() as plain:
        run_loop(model, x, labels)
    with relcache.cached(model, config):
        with flop_counter() as counter:
            run_loop(model, x, labels)
        st = relcache.stats(model).contexts["default"]
    assert st.model_executed_flops == counter.get_total_flops()
    assert st.model_full_flops == plain.get_total_flops()
    if config.label == FORA(1, 1).label:  # all full: the plain model less LAYERS copies in each of 11 calls
        with flop_counter() as one:
            model.transformer_blocks[0].norm1.emb(torch.full((2,), 999), labels, hidden_dtype=torch.float32)
        assert one.get_total_flops() > 0
        assert st.model_executed_flops == plain.get_total_flops() - 11 * LAYERS * one.get_total_flops()


def test_a_later_generation_executes_and_reports_the_copies_the_measuring_call_ran():
    """The first generation's measuring call computes (and counts) every copy; an identical later generation has no
    measuring call, so it executes LAYERS copies less, and reports exactly that: stats follow what ran."""
    model = tiny_dit(layers=LAYERS)
    x, labels = inputs()
    with flop_counter() as plain:
        run_loop(model, x, labels)
    with flop_counter() as one:
        model.transformer_blocks[0].norm1.emb(torch.full((2,), 999), labels, hidden_dtype=torch.float32)
    with relcache.cached(model, FORA(1, 1)):
        executed = []
        for _ in range(3):
            with flop_counter() as counter:
                run_loop(model, x, labels)
            st = relcache.stats(model).contexts["default"]
            assert st.model_executed_flops == counter.get_total_flops()
            assert st.model_full_flops == plain.get_total_flops()
            executed.append(st.model_executed_flops)
    assert executed[0] - executed[1] == LAYERS * one.get_total_flops() > 0
    assert executed[1] == executed[2] == plain.get_total_flops() - 12 * LAYERS * one.get_total_flops()


def test_shared_under_inference_mode(tied):
    """Inference tensors keep no version counter: the copies are matched by identity, and shared all the same."""
    model, x, labels, calls = tied
    ref = run_loop(model, x, labels, steps=3)
    calls.clear()
    with relcache.cached(model, FORA(1, 1)), torch.inference_mode():
        relcache.begin_generation(model, 3)
        out = [model(x, timestep=torch.full((2,), t), class_labels=labels).sample for t in (999, 666, 333)]
    assert calls == [*range(LAYERS), 0, 0, 0]
    # run_loop feeds each step's output back; compare the first step, which sees the same input
    assert torch.equal(out[0], ref[0])


def test_one_module_object_for_every_copy():
    """Copies tied as one module object (a memory saving) are one copy called several times: enable accepts it,
    and the object computes once per call."""
    model = tiny_dit(layers=LAYERS)
    emb = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = emb
    x, labels = inputs()
    ref = run_loop(model, x, labels)
    calls: list[int] = []
    emb.time_proj.register_forward_hook(lambda *_: calls.append(0))
    with relcache.cached(model, FORA(1, 1)):
        out = run_loop(model, x, labels)
    assert len(calls) == (LAYERS + 1) + 11  # all at the measured first call, then once per call
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_the_first_compiled_call_takes_the_copies_hooks_off():
    """Under torch.compile the copies are never shared, and each hook's wrapper only added dynamo guards to every
    compiled frame: the first compiled call takes the hooks off for good. Outputs stay the eager run's."""
    torch._dynamo.reset()
    model = tiny_dit(layers=2)
    x, labels = inputs()
    relcache.enable(model, FORA(3))
    eager = run_loop(model, x, labels, steps=6)
    hooked = [hasattr(b.norm1.emb, "_diffusers_hook") for b in model.transformer_blocks]
    relcache.disable(model)
    compiled = torch.compile(model, backend="eager")
    relcache.enable(compiled, FORA(3))
    try:
        assert all(hasattr(b.norm1.emb, "_diffusers_hook") for b in model.transformer_blocks)
        out = run_loop(compiled, x, labels, steps=6)
        assert not any(hasattr(b.norm1.emb, "_diffusers_hook") or "forward" in vars(b.norm1.emb)
                       for b in model.transformer_blocks)
        again = run_loop(compiled, x, labels, steps=6)
    finally:
        relcache.disable(compiled)
        torch._dynamo.reset()
    assert hooked == [True, True]
    assert not any(hasattr(b.norm1.emb, "_diffusers_hook") for b in model.transformer_blocks)  # disable: as before
    for a, b, c in zip(eager, out, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
