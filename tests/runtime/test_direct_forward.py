"""A hooked submodule calls relcache's hook directly (``attachment.DirectHook``), not through diffusers' registry
wrapper, and stays a good citizen of that registry and of accelerate: a hook registered after relcache's wraps it and
runs, ``disable`` leaves that hook working on the original forward, a hook under relcache's can be removed while
relcache is enabled, and an accelerate hook under relcache's works after ``disable``."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import run_loop, tiny_dit
from diffusers.hooks.hooks import HookRegistry, ModelHook

import relcache
from relcache import FORA
from relcache.runtime.attachment import DirectHook
from relcache.runtime.hooks import MODULATION_HOOK, MODULE_HOOK, SHARED_HOOK, SOURCE_HOOK


class _Counting(ModelHook):
    """A user's hook: counts the calls it sees, changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):  # noqa: ANN202 - diffusers' signature
        self.calls += 1
        return args, kwargs


class _CountingForward(ModelHook):
    """A user's hook with its own ``new_forward``: counts the calls it sees, calls the forward it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):  # noqa: ANN202 - diffusers' signature
        self.calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 7])


def test_each_hooked_submodule_calls_its_hook_directly_and_the_model_keeps_the_registry_wrapper():
    model = tiny_dit(layers=2)
    relcache.enable(model, FORA(2), batch_modulation=True)
    try:
        seen = {}
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or module is model:
                continue
            outer = registry.hooks[registry._hook_order[-1]]
            assert isinstance(outer, DirectHook)
            # the outermost hook's own bound method, not a functools.partial over the registry's closure
            assert module.forward.__func__ is type(outer).direct_forward and module.forward.__self__ is outer
            seen.update(dict.fromkeys(registry._hook_order))
        assert set(seen) == {MODULE_HOOK, MODULATION_HOOK, SOURCE_HOOK, SHARED_HOOK}
        assert isinstance(model.forward, functools.partial)  # the model's forward keeps its signature (__wrapped__)
    finally:
        relcache.disable(model)
    assert not any("forward" in vars(m) or hasattr(m, "_diffusers_hook") for m in model.modules())


@pytest.mark.parametrize("hook", [_Counting, _CountingForward])
def test_a_hook_registered_after_relcaches_wraps_it_and_outlives_disable(hook: type[ModelHook]):
    """With its own ``new_forward`` too: ``disable`` removing relcache's hook under it made diffusers' registry relink
    the user's hook by the wrong field (``forward``, not ``original_forward``), and the user's hook stopped running
    while the registry still listed it (found by a careful-user review)."""
    x, y = _inputs()
    model = tiny_dit(layers=2)
    relcache.enable(model, FORA(3))
    expected = run_loop(model, x, y, steps=6)
    full_steps = relcache.stats(model).full_steps
    relcache.disable(model)
    plain = run_loop(model, x, y, steps=2, begin=False)

    relcache.enable(model, FORA(3))
    attn = model.transformer_blocks[0].attn1
    counting = hook()
    HookRegistry.check_if_exists_or_initialize(attn).register_hook(counting, "user_counting")
    got = run_loop(model, x, y, steps=6)
    assert counting.calls == 6  # called at every step, cached ones included: it wraps relcache's hook
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert relcache.stats(model).full_steps == full_steps == [0, 1, 4]  # the same schedule, wrapped or not
    relcache.disable(model)

    registry = attn._diffusers_hook
    assert registry._hook_order == ["user_counting"]
    after = run_loop(model, x, y, steps=2, begin=False)
    assert counting.calls == 8  # still called, now around the original forward
    for a, b in zip(plain, after, strict=True):
        assert torch.equal(a, b)


def test_a_hook_under_relcaches_removed_while_enabled_is_gone_and_relcache_still_serves():
    """Found by review: removing a hook registered before relcache's (group offloading does, when a LoRA loads)
    relinked relcache's hook wrongly in diffusers' registry. The removed hook kept running (direct call), or before
    that relcache's hook was skipped and the module computed at every step."""
    x, y = _inputs()
    model = tiny_dit(layers=2)
    attn = model.transformer_blocks[0].attn1
    counting = _Counting()
    HookRegistry.check_if_exists_or_initialize(attn).register_hook(counting, "user_counting")
    relcache.enable(model, FORA(3))
    try:
        run_loop(model, x, y, steps=6)
        assert counting.calls == 3  # under relcache's hook: called where the module computes (steps 0, 1 and 4)
        attn._diffusers_hook.remove_hook("user_counting", recurse=False)
        computed = []
        handle = attn.to_q.register_forward_pre_hook(lambda *_: computed.append(1))
        run_loop(model, x, y, steps=6)
        handle.remove()
        assert counting.calls == 3  # gone
        assert len(computed) == 3 and relcache.stats(model).full_steps == [0, 1, 4]  # still cached at 2, 3 and 5
    finally:
        relcache.disable(model)
    assert "forward" not in vars(attn)


def test_an_accelerate_hook_on_a_submodule_before_enable_is_left_working_by_disable():
    """Found by review: an accelerate hook already on a cached module (sequential CPU offload, a device map) sits under
    relcache's. ``disable`` took it off and put it back over the forward it had wrapped, so the next call recursed."""
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module

    class _Counted(AccelerateHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):  # noqa: ANN202 - accelerate's signature
            _Counted.calls += 1
            return args, kwargs

    x, y = _inputs()
    model = tiny_dit(layers=2)
    plain = run_loop(model, x, y, steps=2, begin=False)
    attn = model.transformer_blocks[0].attn1
    add_hook_to_module(attn, _Counted())
    relcache.enable(model, FORA(3))
    run_loop(model, x, y, steps=3)
    relcache.disable(model)
    calls = _Counted.calls
    after = run_loop(model, x, y, steps=2, begin=False)
    assert _Counted.calls == calls + 2  # still there, once per call
    for a, b in zip(plain, after, strict=True):
        assert torch.equal(a, b)
    assert attn._hf_hook is not None and not hasattr(attn, "_diffusers_hook")
