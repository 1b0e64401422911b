"""An adapter for your own DiT: name its blocks and, in each block, the modules to cache.

Nothing is registered for it: pass it to ``relcache.enable(model, config, adapter=CustomAdapter(...))``. Each named
module must be called once per transformer call, on its input (e.g. the adaLN-modulated norm), and return the
output *before* the block applies its gate and residual add; see docs/custom-models.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError, as_int
from ..methods.config import MODULE_KINDS
from .base import Adapter, CachedModule, InputFn, first_tensor_input


def _check_blocks(blocks: object) -> str | Sequence[nn.Module]:
    if isinstance(blocks, str) and blocks:
        return blocks
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) or (
        isinstance(blocks, (list, tuple)) and blocks and all(isinstance(b, nn.Module) for b in blocks)
    ):
        return blocks
    raise ConfigError(
        "CustomAdapter blocks must be an attribute name (e.g. 'blocks') or a non-empty sequence of blocks (not one "
        f"module), got {blocks!r}"
    )


def _check_modules(modules: object) -> list[tuple[str, str]]:
    allowed = (f"CustomAdapter modules must map attribute names to kinds in {MODULE_KINDS}, as a dict or a sequence "
               "of (attribute, kind) pairs, at least one")
    if isinstance(modules, Mapping):
        pairs = list(modules.items())
    elif isinstance(modules, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in modules):
        pairs = [tuple(p) for p in modules]
    else:
        raise ConfigError(f"{allowed}; got {modules!r}")
    if not pairs:
        raise ConfigError(f"{allowed}; got none")
    bad = [kind for _, kind in pairs if not isinstance(kind, str) or kind not in MODULE_KINDS]
    if bad:
        raise ConfigError(f"{allowed}; got the kinds {bad}")
    names = [attr for attr, _ in pairs if not isinstance(attr, str) or not attr]
    if names:
        raise ConfigError(f"{allowed}; got the attribute names {names}")
    return pairs


def _check_input_of(input_of: object) -> Any:
    if callable(input_of) or (isinstance(input_of, Mapping) and all(
        isinstance(k, str) and callable(v) for k, v in input_of.items()
    )):
        return input_of
    raise ConfigError(
        "CustomAdapter input_of must be a function (args, kwargs) -> input, or a dict from attribute name to such a "
        f"function, got {input_of!r}"
    )


def _check_timestep(timestep: object) -> str | int:
    if isinstance(timestep, str) and timestep:
        return timestep
    index = as_int(timestep)
    if index is None or index < 0:
        raise ConfigError(
            "CustomAdapter timestep must be the forward's keyword name (a str) or positional index (an integer >= 0) "
            f"of the timestep, got {timestep!r}"
        )
    return index


def _check_model_classes(model_classes: object) -> tuple[str, ...]:
    if isinstance(model_classes, (list, tuple)) and all(isinstance(c, str) and c for c in model_classes):
        return tuple(model_classes)
    raise ConfigError(f"CustomAdapter model_classes must be a tuple of class names, got {model_classes!r}")


class CustomAdapter(Adapter):
    """Caches ``block.<attr>`` of every block, for the ``(attr, kind)`` pairs of ``modules`` in execution order.

    ``blocks``: the model's attribute holding its blocks (a dotted path such as ``"blocks"``, resolved when caching
    is enabled) or the blocks themselves. ``modules``: ``{"attn": "attn", "mlp": "mlp"}`` or a sequence of pairs;
    kinds are ``"attn"``, ``"cross_attn"`` or ``"mlp"``, attributes may be dotted (``"attn.proj"``).
    ``input_of``: how to find a module's input among its call arguments (default: the first positional argument or
    ``hidden_states=``), one function for all or a mapping from attribute to function. ``timestep``: where the
    transformer's forward receives the timestep, a keyword name or a positional index (used only to notice a new
    generation in a hand-written loop). ``model_classes``: class names to serve if you ``register_adapter`` it.
    ``probe``: where ``input_of`` returns several inputs (a joint module), the index of the one RCS reads and a
    call's rows are cut by (``CachedModule.probe``): one index for every module, or a dict from attribute to index
    (0 for the attributes it leaves out). ``batched=False``: the blocks run one packed sequence without a
    batch axis, ``(tokens, dim)``; per-sample norms then span the whole sequence (``CachedModule.batched``).
    """

    def __init__(
        self,
        blocks: str | Sequence[nn.Module],
        modules: Mapping[str, str] | Sequence[tuple[str, str]],
        input_of: InputFn | Mapping[str, InputFn] = first_tensor_input,
        timestep: str | int = "timestep",
        model_classes: tuple[str, ...] = (),
        probe: int | Mapping[str, int] = 0,
        batched: bool = True,
    ) -> None:
        self.blocks = _check_blocks(blocks)
        self.modules = _check_modules(modules)
        self.input_of = _check_input_of(input_of)
        self.timestep = _check_timestep(timestep)
        self.model_classes = _check_model_classes(model_classes)
        probes = probe if isinstance(probe, Mapping) else {attr: probe for attr, _ in self.modules}
        checked = {attr: as_int(i) if isinstance(attr, str) else None for attr, i in probes.items()}
        if not probes or any(i is None or i < 0 for i in checked.values()):
            raise ConfigError("CustomAdapter probe must be an integer >= 0 (which of input_of's inputs RCS reads) or "
                              f"a dict from attribute name to one, got {probe!r}")
        if not isinstance(batched, bool):
            raise ConfigError(f"CustomAdapter batched must be True or False, got {batched!r}")
        attrs = [attr for attr, _ in self.modules]
        for name, given in (("probe", probe), ("input_of", self.input_of)):
            unknown = sorted(set(given) - set(attrs)) if isinstance(given, Mapping) else []
            if unknown:  # a typo would silently fall back to the default
                raise ConfigError(f"CustomAdapter {name} names attributes that modules does not: {unknown}; the "
                                  f"attributes are {attrs}")
        self.probe, self.batched = checked, batched

    def _blocks(self, model: nn.Module) -> tuple[str, Sequence[nn.Module]]:
        if not isinstance(self.blocks, str):
            return "blocks", self.blocks
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError as err:
            raise ConfigError(f"{type(model).__name__} has no submodule {self.blocks!r} (CustomAdapter)") from err
        items = list(blocks) if hasattr(type(blocks), "__iter__") else []  # a container module of its own too
        if not items or not all(isinstance(b, nn.Module) for b in items):
            raise ConfigError(
                f"CustomAdapter blocks={self.blocks!r} names one {type(blocks).__name__} of {type(model).__name__}, "
                "not a sequence of blocks: name the nn.ModuleList (or nn.Sequential) that holds them")
        return self.blocks, blocks

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        prefix, blocks = self._blocks(model)
        per_attr = isinstance(self.input_of, Mapping)
        out = []
        found = dict.fromkeys((attr for attr, _ in self.modules), False)
        for i, block in enumerate(blocks):
            for attr, kind in self.modules:
                try:
                    module = block.get_submodule(attr)
                except AttributeError:
                    continue
                found[attr] = True
                fn = self.input_of.get(attr, first_tensor_input) if per_attr else self.input_of
                out.append(CachedModule(f"{prefix}.{i}.{attr}", module, kind, fn, self.probe.get(attr, 0),
                                        self.batched))
        missing = [attr for attr, ok in found.items() if not ok]
        if missing:
            raise ConfigError(f"no block of {type(model).__name__}.{prefix} has the module(s) {missing}")
        return out

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(self.timestep, int):
            return args[self.timestep] if len(args) > self.timestep else None
        return kwargs.get(self.timestep)
