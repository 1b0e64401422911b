"""Attaching relcache's hooks to diffusers' hook registry next to accelerate's, and taking them off leaving the
modules as they were. A ``DirectHook`` (a hook whose whole work is ``new_forward``) is called by its module directly,
without the registry's wrapper."""

from __future__ import annotations

from typing import Any

from diffusers.hooks.hooks import HookFunctionReference, HookRegistry, ModelHook
from torch import nn

from ..errors import AlreadyEnabledError


class DirectHook(ModelHook):
    """A hook on a submodule whose whole work is ``new_forward``: the module may call ``direct_forward`` in place of
    the registry's wrapper (``Attachment.register``), the same call with fewer objects around it."""

    module: nn.Module | None = None  # the module it is registered on

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.module = module
        return module

    def direct_forward(self, *args: Any, **kwargs: Any) -> Any:
        """What the registry's wrapper runs for this hook (diffusers' default pre- and post-forward pass their
        arguments through)."""
        return self.new_forward(self.module, *args, **kwargs)


def refuse_diffusers_cache(models: list[tuple[str, nn.Module]], after: bool = False) -> None:
    """Raise ``AlreadyEnabledError`` where one of ``models`` (attribute name, transformer) has a diffusers cache on
    (``CacheMixin.enable_cache``; ``after``: turned on after ``enable``). Two caches would each skip work the other
    plans for, giving an output neither method gives, and relcache's stats would not count what the other skipped;
    diffusers refuses a second cache of its own the same way (found by a careful-user review, 2026-12-07)."""
    for name, model in models:
        if getattr(model, "is_cache_enabled", False):
            what = type(getattr(model, "_cache_config", None)).__name__
            was = "was enabled" if after else "is enabled"
            raise AlreadyEnabledError(
                f"diffusers' cache ({what}) {was} on the {name} ({type(model).__name__})"
                f"{' after relcache.enable' if after else ''}: two caches would skip each other's work. Use one: "
                f"{name}.disable_cache(), or relcache.disable(...)")


class _RelinkedReference(HookFunctionReference):
    """diffusers' function reference of a hook with its own ``new_forward``, on which a relink lands where it belongs.

    When a hook registered under this one is removed, ``HookRegistry.remove_hook`` relinks the chain by setting this
    reference's ``forward`` to what the removed hook wrapped. For a hook with its own ``new_forward`` that is the wrong
    field: ``forward`` is the call of ``new_forward``, and the forward the hook wraps is ``original_forward``. The
    registry's wrapper then skipped relcache's hook from that call on (the module computed at every step, uncounted),
    and ``direct_forward`` kept calling the removed hook (found by review, 2026-12-05; group offloading removes and
    re-applies its hooks when a LoRA is loaded). Here such a relink sets ``original_forward``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and self.__dict__.get("original_forward") is not None:
            name = "original_forward"
        super().__setattr__(name, value)


def _mend_next_reference(registry: HookRegistry, name: str) -> None:
    """Before hook ``name`` is removed: the hook registered next over it, where it has its own ``new_forward`` (a
    user's or another library's), gets the relink on the right field too (``_RelinkedReference``). Otherwise it stopped
    running at ``disable``, though the registry still listed it (found by a careful-user review, 2026-12-07)."""
    order = registry._hook_order
    index = order.index(name) if name in order else len(order)
    if index + 1 < len(order):
        ref = registry._fn_refs[index + 1]
        if type(ref) is HookFunctionReference and ref.original_forward is not None:
            ref.__class__ = _RelinkedReference


def _call_directly(module: nn.Module, registry: HookRegistry, hook: ModelHook, name: str) -> None:
    """Let ``module`` call ``hook.direct_forward`` itself instead of the wrapper diffusers' registry just installed,
    where that is the same call: ``hook`` is a ``DirectHook``, the module's outermost hook, with diffusers' default
    ``pre_forward`` and ``post_forward``.

    The registry's wrapper is a ``functools.partial`` over a closure over the hook's function reference, which holds a
    second partial and the pre- and post-forward methods. Under ``torch.compile`` dynamo guards each of those objects
    at every call of the frame: about 14 guards per hooked module in a compiled cached step (113 hooked modules at
    DiT-XL/2's depth with batch modulation; docs/performance.md, "The registry's wrapper"). Eagerly it is four Python
    calls per module call. The registry keeps the hook as before: ``get_hook`` finds it, a hook registered later wraps
    this method as it would have wrapped the registry's, and ``remove_hook`` puts back the forward the hook wrapped.
    (choice) The module's ``forward`` then shows the generic signature ``(*args, **kwargs)``, where the registry's
    wrapper carried the original's (``__wrapped__``); diffusers and pipelines read the signature of the model's
    forward, which keeps the wrapper, or of a module's class."""
    cls = type(hook)
    if (isinstance(hook, DirectHook) and registry._hook_order[-1:] == [name]
            and cls.pre_forward is ModelHook.pre_forward and cls.post_forward is ModelHook.post_forward):
        module.forward = hook.direct_forward


def _without_accelerate_hook(module: nn.Module) -> Any:
    """Take accelerate's hook off ``module`` (returned, or None) so a registry change can go under it."""
    hf_hook = getattr(module, "_hf_hook", None)
    if hf_hook is not None:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module)
    return hf_hook


def _restore_accelerate_hook(module: nn.Module, hf_hook: Any) -> None:
    if hf_hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(module, hf_hook)


class Attachment:
    """The hooks registered on one model's modules, and how to take them off leaving the modules as they were."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._attached: list[tuple[nn.Module, str, bool]] = []  # (module, hook name, registry existed before)
        # (id(module), hook name) where an accelerate hook was on the submodule before ours: it stays under ours
        self._accelerate_under: set[tuple[int, str]] = set()

    def register(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        """Register ``hook`` on ``module``. On the model itself it goes under accelerate's model offload hook, which
        must stay outermost: pipelines re-apply it after every call by restoring the forward it wrapped
        (``_old_forward``), which would drop a wrapper registered over it."""
        hf_hook = _without_accelerate_hook(module) if module is self.model else None
        existed = hasattr(module, "_diffusers_hook")
        try:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(hook, name)  # raises if the name is taken: then nothing of ours is there
            self._attached.append((module, name, existed))
            if hf_hook is None and getattr(module, "_hf_hook", None) is not None:
                self._accelerate_under.add((id(module), name))
            if type(hook.fn_ref) is HookFunctionReference and hook.fn_ref.original_forward is not None:
                hook.fn_ref.__class__ = _RelinkedReference  # the registry's own object: it relinks that one
            if module is not self.model:  # the model keeps the registry's wrapper: it carries forward's signature
                _call_directly(module, registry, hook, name)
        except BaseException:
            if not existed and hasattr(module, "_diffusers_hook") and not module._diffusers_hook.hooks:
                del module._diffusers_hook
            raise
        finally:
            _restore_accelerate_hook(module, hf_hook)

    def done(self) -> None:
        """All hooks are registered: the model's registry must see its children's new hooks."""
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    def move(self, old: nn.Module, new: nn.Module, hook: ModelHook, name: str) -> None:
        """Take hook ``name`` off ``old`` (a module replaced in the model) and register ``hook`` on ``new``, which took
        its place; call ``done`` after the last move."""
        for entry in [e for e in self._attached if e[0] is old and e[1] == name]:
            self._remove(*entry)
            self._attached.remove(entry)
        self.register(new, hook, name)

    def remove_all(self, name: str) -> None:
        """Take hook ``name`` off every module it is on here, where it is the module's outermost hook (diffusers'
        registry relinks an inner hook's neighbour wrongly for hooks with their own ``new_forward``); elsewhere it
        stays until ``detach``."""
        for entry in [e for e in reversed(self._attached) if e[1] == name]:
            registry = getattr(entry[0], "_diffusers_hook", None)
            if registry is not None and registry._hook_order[-1:] == [name]:
                self._remove(*entry)
                self._attached.remove(entry)
        self.done()

    def detach(self) -> None:
        """Remove every hook registered here, in reverse order."""
        for module, name, existed in reversed(self._attached):
            self._remove(module, name, existed)
        self._attached = []
        root = getattr(self.model, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()

    def _remove(self, module: nn.Module, name: str, existed: bool) -> None:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            return
        # an accelerate hook added after ours (enable_model_cpu_offload) wraps our forward, and remove_hook
        # would overwrite it: take it off first and put it back after. One that was on the submodule before ours
        # (sequential offload, a device map) is under ours: remove_hook gives its forward back, and taking it off
        # and on again wrapped its stale forward in a new one (a RecursionError at the next call, found by review)
        under = (id(module), name) in self._accelerate_under
        self._accelerate_under.discard((id(module), name))
        hf_hook = None if under else _without_accelerate_hook(module)
        _mend_next_reference(registry, name)
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            # remove_hook leaves the original bound method as an instance attribute: drop it.
            fwd = vars(module).get("forward")
            if getattr(fwd, "__self__", None) is module and getattr(fwd, "__func__", None) is type(
                module
            ).forward:
                del module.forward
            if not existed:
                del module._diffusers_hook
        _restore_accelerate_hook(module, hf_hook)
