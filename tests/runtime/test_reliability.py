"""Issue 16, items 2, 6 and 7: a non-finite sample leaves the others' decisions alone; a cached module replaced after
``enable`` is followed; FLOP counting that fails never breaks a generation and can be turned off."""

import math

import numpy as np
import pytest
import torch
from conftest import TORCH_RELEASE, dit_inputs, run_loop, tiny_dit
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

import relcache
from relcache import FORA
from relcache.runtime import accounting

STEPS = 20


def _batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([1, 5, 9][:n])


# -- item 2: one NaN sample ----------------------------------------------------------------------------------------
def test_a_nan_sample_changes_nothing_for_the_others():
    """RFC(threshold=0.5) on a batch of 3 whose sample 1 is NaN: samples 0 and 2 get the full steps and outputs of a
    run of those two alone (before: the batch mean was NaN, ``NaN > tau`` false, full steps only the warm-up)."""
    model = tiny_dit()
    x, y = _batch()
    healthy = [0, 2]
    with relcache.cached(model, relcache.RFC(threshold=0.5)):
        alone = run_loop(model, x[healthy], y[healthy], steps=STEPS)
        want = relcache.stats(model)
        bad = x.clone()
        bad[1] = math.nan
        outs = run_loop(model, bad, y, steps=STEPS)
        got = relcache.stats(model)
    assert len(want.full_steps) > 4  # the threshold does cache: the check below is not about warm-up only
    assert got.full_steps == want.full_steps
    for a, b in zip(outs, alone, strict=True):
        assert torch.isnan(a[1]).all()
        torch.testing.assert_close(a[healthy], b, rtol=1e-5, atol=1e-5)
    # stats say a sample went non-finite: at every step whose error was measured, 1 of 3
    measured = [s for s in range(STEPS) if s in got.contexts["default"].input_errors]
    assert got.contexts["default"].nonfinite_samples == {s: 1 for s in measured} and got.nonfinite_samples == 1
    assert want.nonfinite_samples == 0 and want.contexts["default"].nonfinite_samples == {}


def test_every_sample_non_finite_makes_every_step_full():
    model = tiny_dit()
    x, y = _batch(2)
    x[:] = math.inf
    with relcache.cached(model, relcache.RFC(threshold=0.5)):
        run_loop(model, x, y, steps=8)
        st = relcache.stats(model)
    assert st.full_steps == list(range(8)) and st.nonfinite_samples == 2
    with relcache.cached(model, relcache.RFC(target_nfc=4)):  # the budget still caps
        run_loop(model, x, y, steps=8)
        assert relcache.stats(model).full_steps == [0, 1, 2, 3]


# -- item 7: FLOP counting never breaks a generation ---------------------------------------------------------------
class _Raise(TorchDispatchMode):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.seen = fail_at, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.seen += 1
            if self.seen == self.fail_at:
                raise TypeError(f"no implementation found for {func} (injected)")
        return func(*args, **(kwargs or {}))


class _FailingCounter(FlopCounterMode):
    """A FLOP counter that raises at the ``fail_at``-th attention kernel it sees: an operator it cannot count."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(display=False)
        self.raiser = _Raise(fail_at)

    def __enter__(self):
        out = super().__enter__()
        self.raiser.__enter__()
        return out

    def __exit__(self, *exc):
        self.raiser.__exit__(*exc)
        return super().__exit__(*exc)


def _dit_run(config, steps=12, **enable):
    model = tiny_dit()
    x, y = _batch(2)
    relcache.enable(model, config, **enable)
    try:
        return run_loop(model, x, y, steps=steps), relcache.stats(model)
    finally:
        relcache.disable(model)


@pytest.mark.parametrize("fail_at", [1, 3])  # in block 0's attention (nothing recorded yet), in block 2's
@pytest.mark.parametrize("config", [relcache.TaylorSeer(interval=3, order=2), relcache.RFC(threshold=0.3)],
                         ids=["TaylorSeer", "RFC"])
def test_a_failing_flop_counter_leaves_the_generation_as_without_counting(monkeypatch, fail_at, config):
    """The first call's measurement raises once block ``fail_at - 1``'s attention runs (after the earlier blocks'
    modules recorded their outputs): the call runs again from the state before it, so the differences are recorded
    once, and the outputs are bit-identical to a run that never counts. RFC's schedule decides inside the call, at its
    first cached module, after the state was saved: its decision and the record steps it set stand (before
    2026-12-05 they were put back, so the next full step recorded with a gap of 0: infinite differences, NaN
    outputs; seen under torch 2.11, whose FLOP counter fails on Cosmos 3's attention)."""
    want, off = _dit_run(config, count_flops=False)
    assert off.flops_unknown == accounting.COUNTING_OFF and math.isnan(off.flops_fraction)
    counters = []
    monkeypatch.setattr(accounting, "flop_counter", lambda: counters.append(_FailingCounter(fail_at)) or counters[-1])
    got, st = _dit_run(config)
    assert len(counters) == 1  # it failed once, then counting stayed off
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert st.full_steps == off.full_steps and "TypeError" in st.flops_unknown and "injected" in st.flops_unknown
    ctx = st.contexts["default"]
    assert all(math.isnan(v) for v in (st.flops_fraction, st.model_flops_fraction, ctx.executed_flops,
                                       ctx.full_flops, ctx.model_executed_flops, ctx.model_full_flops))
    assert not _get_current_dispatch_mode_stack()


def test_counted_flops_are_unchanged_and_known():
    _, st = _dit_run(relcache.FORA(3))
    assert st.flops_unknown is None and 0 < st.flops_fraction < 1 and st.contexts["default"].flops_unknown is None


def test_a_model_error_under_counting_still_propagates():
    """Only an error that goes away without counting is blamed on counting."""
    model = tiny_dit()
    x, y = _batch(2)
    handle = model.transformer_blocks[1].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(ValueError("x")))
    relcache.enable(model, relcache.FORA(3))
    try:
        with pytest.raises(ValueError, match="x"):
            run_loop(model, x, y, steps=2)
        handle.remove()
        run_loop(model, x, y, steps=4)
        assert relcache.stats(model).flops_unknown is None
    finally:
        relcache.disable(model)


def test_count_flops_must_be_a_bool():
    with pytest.raises(relcache.ConfigError, match="count_flops must be True or False, got 'no'"):
        relcache.enable(tiny_dit(layers=1), relcache.FORA(), count_flops="no")


@pytest.fixture
def flex():
    """diffusers' ``set_attention_backend`` also sets a process-wide active backend: put it back after the test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def test_flex_attention_on_flux_runs_and_leaves_the_process_usable(flex):
    """With flex attention (diffusers' "flex" backend), torch's FlopCounterMode raises inside flex's compiled eager
    path (torch 2.11 to 2.14; 2.15 counts it) and left dynamo unable to run flex again: every later flex call in the
    process failed, relcache or not."""
    from families import flux_kwargs, flux_pipe

    def gen(p):
        return p(**flux_kwargs(), num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images

    pipe = flux_pipe()
    pipe.transformer.set_attention_backend("flex")
    plain = gen(pipe)
    with relcache.cached(pipe, relcache.FORA(1, 1)):  # every step full: the output is the plain model's
        out = gen(pipe)
        st = relcache.stats(pipe)
    assert np.array_equal(out, plain) and not _get_current_dispatch_mode_stack()
    if TORCH_RELEASE >= (2, 15):  # counts flex (2.15.0, 2026-12-06)
        assert st.flops_unknown is None and st.flops_fraction == 1.0
    else:
        assert st.flops_unknown is not None and "TypeError" in st.flops_unknown and math.isnan(st.flops_fraction)
    other = flux_pipe()  # never enabled
    other.transformer.set_attention_backend("flex")
    assert np.array_equal(gen(other), plain)


# -- item 6: modules replaced after enable -------------------------------------------------------------------------
def _lora(transformer, seed=1):
    from peft import LoraConfig

    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so the LoRA changes the output
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["proj_mlp", "to_q"],
                                       init_lora_weights=False))


def _flux(pipe):
    from families import flux_kwargs

    out = pipe(**flux_kwargs(), num_inference_steps=8, generator=torch.manual_seed(0), output_type="np").images
    return out, relcache.stats(pipe)


def _hooked(pipe):
    return sorted(name for name, m in pipe.transformer.named_modules()
                  if "relcache_module" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}))


def test_unloading_a_lora_after_enable_moves_the_hooks_back():
    """A LoRA loaded before ``enable`` wraps ``proj_mlp``, so the hook goes on the wrapper; unloading puts the plain
    module back. Before: both ``proj_mlp`` silently ran uncached (5 of 7 modules hooked) while ``stats`` still
    counted them as cached. Now: the same output and stats as a pipeline that never had the LoRA."""
    pytest.importorskip("peft")
    from families import flux_pipe

    config = relcache.FORA(3)
    ref = flux_pipe()
    with relcache.cached(ref, config):
        want, want_st = _flux(ref)
        want_hooked = _hooked(ref)
    pipe = flux_pipe()
    _lora(pipe.transformer)
    with relcache.cached(pipe, config):
        with_lora, _ = _flux(pipe)
        pipe.unload_lora_weights()
        got, st = _flux(pipe)
        assert _hooked(pipe) == want_hooked and len(want_hooked) == 7
    assert not np.array_equal(with_lora, want)  # the LoRA did change the output
    assert np.array_equal(got, want)
    assert st.flops_fraction == want_st.flops_fraction and st.model_flops_fraction == want_st.model_flops_fraction


def test_a_lora_loaded_after_enable_is_cached_like_one_loaded_before():
    """Before: the hook stayed on ``proj_mlp.base_layer`` (the LoRA's delta ran at every step), output off by 7e-3."""
    pytest.importorskip("peft")
    from families import flux_pipe

    config = relcache.FORA(3)
    first = flux_pipe()
    _lora(first.transformer)
    with relcache.cached(first, config):
        want, want_st = _flux(first)
    pipe = flux_pipe()
    with relcache.cached(pipe, config):
        _flux(pipe)
        _lora(pipe.transformer)
        got, st = _flux(pipe)
        hooked = _hooked(pipe)
    assert np.array_equal(got, want)
    assert not any(name.endswith("base_layer") for name in hooked) and len(hooked) == 7
    assert st.flops_fraction == want_st.flops_fraction and st.model_flops_fraction == want_st.model_flops_fraction


def test_a_cached_module_removed_from_the_model_is_a_clear_error():
    model = tiny_dit()
    x, y = _batch(2)
    with relcache.cached(model, relcache.FORA(3)):
        run_loop(model, x, y, steps=3)
        model.transformer_blocks = model.transformer_blocks[:2]
        with pytest.raises(RuntimeError, match=r"cached module 'transformer_blocks\.2\.attn1' was removed .* "
                                               r"relcache\.disable and relcache\.enable again"):
            run_loop(model, x, y, steps=3)


def test_measure_flops_counts_reports_unknown_or_propagates():
    """``relcache bench``'s FLOP pass: exact on a matmul (2·m·n·k), NaN where the counter fails inside a dispatch
    mode (an operator it cannot count), and a model's own error propagates."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from relcache.runtime.accounting import measure_flops

    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert measure_flops(lambda: a @ b) == 2 * 3 * 4 * 5

    class _Uncountable(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            raise RuntimeError(f"cannot count {func} (injected)")

    def uncountable() -> None:
        with _Uncountable():
            torch.matmul(a, b)

    assert math.isnan(measure_flops(uncountable))
    assert not _get_current_dispatch_mode_stack()

    def broken() -> None:
        raise ValueError("the model's own error")

    with pytest.raises(ValueError, match="own error"):
        measure_flops(broken)


def test_measure_flops_within_a_module_counts_its_calls_only():
    """``relcache bench --model``: the transformer's FLOPs, not the pipeline's (a VAE's or text encoder's products
    moved the ratio towards 1, found by review). A nested call of the module is counted once; a call that raises
    leaves no counter behind."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from relcache.runtime.accounting import measure_flops

    lin = torch.nn.Linear(8, 4, bias=False)
    a, b = torch.randn(5, 6), torch.randn(6, 7)

    def pipeline() -> None:
        a @ b  # 2 · 5 · 6 · 7 = 420, outside the module
        lin(torch.randn(3, 8))  # 2 · 3 · 8 · 4 = 192
        lin(torch.randn(1, 8))  # 64

    assert measure_flops(pipeline) == 420 + 192 + 64
    assert measure_flops(pipeline, within=lin) == 192 + 64
    outer = torch.nn.Sequential(lin, torch.nn.Linear(4, 2, bias=False))
    assert measure_flops(lambda: outer(torch.randn(3, 8)), within=outer) == 192 + 2 * 3 * 4 * 2

    class Raising(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lin(x)
            raise ValueError("the model's own error")

    raising = Raising()
    with pytest.raises(ValueError, match="own error"):
        measure_flops(lambda: raising(torch.randn(3, 8)), within=raising)
    assert not _get_current_dispatch_mode_stack() and not raising._forward_hooks and not raising._forward_pre_hooks


def test_ssim_window_shrinks_for_small_images():
    """torchmetrics sizes its Gaussian window from sigma alone: the shrunk kernel size was ignored, and images of 5
    pixels or fewer failed (found by review)."""
    from relcache.evaluation.metrics import ssim

    g = torch.Generator().manual_seed(0)
    for size in (8, 5, 4, 3):
        x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        assert ssim(x, x) == pytest.approx(1.0)
        assert ssim(x, x + 0.2 * torch.randn(x.shape, generator=g)) < 0.99
    # on 8 x 8 images the window is 7, not 11: a value of its own (torchmetrics' own 11-window value differs)
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    x = torch.rand(2, 3, 8, 8, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    eleven = float(tm_ssim(x, y, data_range=1.0))
    assert ssim(2 * x - 1, 2 * y - 1) != pytest.approx(eleven, abs=1e-4)


def test_counting_a_no_grad_view_of_a_parameter():
    """A module called under ``no_grad`` on a view of a parameter (requires grad, no grad_fn: Bria FIBO 2's perceiver
    queries) is counted: torch's own module tracker, which relcache's counter leaves out, raised there."""
    from relcache.runtime.accounting import flop_counter

    lin, queries = torch.nn.Linear(4, 5, bias=False), torch.nn.Parameter(torch.randn(3, 4))
    with torch.no_grad():
        view = queries[:2].unsqueeze(0).expand(2, -1, -1)
        assert view.requires_grad and view.grad_fn is None
        with pytest.raises(AssertionError, match="gradient function"), FlopCounterMode(display=False):
            lin(view)
        with flop_counter() as counter:
            lin(view)
    assert counter.get_total_flops() == 2 * (2 * 2) * 4 * 5


def test_gradient_checkpointing_with_autograd_is_refused_and_without_it_runs():
    """Checkpointed blocks run again in the backward pass, after the call, where a cached module computes what the
    forward predicted: torch's checkpoint check failed, or (reentrant) gradients were silently wrong. A call that
    would checkpoint (autograd on) is refused before any step starts; under no_grad, where diffusers does not
    checkpoint, the generation is the one without checkpointing, bit for bit."""
    x, y = dit_inputs()
    plain = tiny_dit()
    with relcache.cached(plain, FORA(3)):
        ref = run_loop(plain, x, y, steps=6)
    model = tiny_dit()
    model.enable_gradient_checkpointing()
    with relcache.cached(model, FORA(3)):
        relcache.begin_generation(model, 6)
        with pytest.raises(relcache.ConfigError, match="gradient checkpointing on while autograd records"):
            model(x, timestep=torch.full((2,), 999), class_labels=y)
        assert relcache.stats(model).num_steps == 0
        got = run_loop(model, x, y, steps=6)  # no_grad
        assert relcache.stats(model).full_steps == [0, 1, 4]
        model.requires_grad_(False)  # nothing needs a gradient: autograd records nothing, nothing to refuse
        relcache.begin_generation(model, 6)
        frozen = [model(x, timestep=torch.full((2,), t), class_labels=y).sample for t in (999, 800)]
        assert not frozen[0].requires_grad
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
