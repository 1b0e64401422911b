"""``Attachment.register``'s rule for calling a hook directly (``attachment._call_directly``), on a small module by
hand: only a ``DirectHook`` with diffusers' default pre- and post-forward, and never on the model itself (whose
registry wrapper carries its forward's signature)."""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch import nn

from relcache.runtime.attachment import Attachment, DirectHook


class _Twice(DirectHook):
    """Doubles the module's output."""

    def new_forward(self, module: nn.Module, *args, **kwargs):  # noqa: ANN202 - diffusers' signature
        return 2 * self.fn_ref.original_forward(*args, **kwargs)


class _TwiceAfterAdding(_Twice):
    """Its own ``pre_forward`` (adds 1 to the input): only the registry's wrapper calls it."""

    def pre_forward(self, module: nn.Module, *args, **kwargs):  # noqa: ANN202 - diffusers' signature
        return tuple(a + 1 for a in args), kwargs


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.inner(hidden_states) * scale


def test_a_direct_hook_with_its_own_pre_forward_goes_through_the_registry():
    model = _Model()
    att = Attachment(model)
    att.register(model.inner, _TwiceAfterAdding(), "t")
    att.done()
    assert isinstance(model.inner.forward, functools.partial)  # the registry's wrapper, not direct_forward
    assert model(torch.ones(2)).tolist() == [4.0, 4.0]  # (1 + 1) * 2: its pre_forward ran
    att.detach()
    assert model(torch.ones(2)).tolist() == [1.0, 1.0]


def test_a_direct_hook_on_a_submodule_is_called_directly_and_on_the_model_keeps_the_wrapper():
    model = _Model()
    att = Attachment(model)
    inner, outer = _Twice(), _Twice()
    att.register(model.inner, inner, "t")
    att.register(model, outer, "t")
    att.done()
    assert model.inner.forward.__func__ is DirectHook.direct_forward and model.inner.forward.__self__ is inner
    assert isinstance(model.forward, functools.partial)
    assert list(inspect.signature(model.forward).parameters) == ["hidden_states", "scale"]
    assert model(torch.ones(2), scale=3.0).tolist() == [12.0, 12.0]  # 1 * 2 (inner) * 3 * 2 (outer)
    att.detach()
    assert not any("forward" in vars(m) or hasattr(m, "_diffusers_hook") for m in model.modules())
    assert model(torch.ones(2), scale=3.0).tolist() == [3.0, 3.0]


class _Counting(ModelHook):
    """A user's hook: counts the calls it sees, changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args, **kwargs):  # noqa: ANN202 - diffusers' signature
        self.calls += 1
        return args, kwargs


def test_remove_all_takes_a_hook_off_only_where_it_is_outermost():
    """``remove_all("t")``: off ``a`` (outermost there), kept on ``b`` under a user's hook registered later, where
    it keeps running until ``detach``; the user's hook runs throughout and outlives ``detach``."""
    model = nn.Module()
    model.a, model.b = nn.Identity(), nn.Identity()
    att = Attachment(model)
    att.register(model.a, _Twice(), "t")
    att.register(model.b, _Twice(), "t")
    user = _Counting()
    HookRegistry.check_if_exists_or_initialize(model.b).register_hook(user, "user")
    att.done()
    att.remove_all("t")
    assert not hasattr(model.a, "_diffusers_hook") and "forward" not in vars(model.a)
    assert model.a(torch.ones(1)).tolist() == [1.0]
    assert model.b._diffusers_hook._hook_order == ["t", "user"]
    assert model.b(torch.ones(1)).tolist() == [2.0] and user.calls == 1
    att.detach()
    assert model.b._diffusers_hook._hook_order == ["user"]
    assert model.b(torch.ones(1)).tolist() == [1.0] and user.calls == 2


class _Refusing(DirectHook):
    def initialize_hook(self, module: nn.Module) -> nn.Module:
        raise RuntimeError("refused")


def test_a_hook_that_fails_to_register_leaves_no_registry_behind():
    """A registration that raises on a module without a registry takes the registry it made off again (the module as
    it was); a module whose registry existed keeps it."""
    import pytest

    model = _Model()
    att = Attachment(model)
    with pytest.raises(RuntimeError, match="refused"):
        att.register(model.inner, _Refusing(), "t")
    assert not hasattr(model.inner, "_diffusers_hook") and "forward" not in vars(model.inner)
    assert model(torch.ones(1)).tolist() == [1.0]
    user = _Counting()
    HookRegistry.check_if_exists_or_initialize(model.inner).register_hook(user, "user")
    with pytest.raises(RuntimeError, match="refused"):
        att.register(model.inner, _Refusing(), "t")
    assert model.inner._diffusers_hook._hook_order == ["user"]
