"""An adapter for your own DiT: name its blocks and, in each block, the modules to cache.

Nothing is registered for it: pass it to ``relcache.enable(model, config, adapter=CustomAdapter(...))``. Each named
module must be called once per transformer call, on its input (e.g. the adaLN-modulated norm), and return the
output *before* the block applies its gate and residual add; see docs/custom-models.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..methods.config import MODULE_KINDS
from .base import Adapter, CachedModule, InputFn, first_tensor_input


class CustomAdapter(Adapter):
    """Caches ``block.<attr>`` of every block, for the ``(attr, kind)`` pairs of ``modules`` in execution order.

    ``blocks``: the model's attribute holding its blocks (a dotted path such as ``"blocks"``, resolved when caching
    is enabled) or the blocks themselves. ``modules``: ``{"attn": "attn", "mlp": "mlp"}`` or a sequence of pairs;
    kinds are ``"attn"``, ``"cross_attn"`` or ``"mlp"``, attributes may be dotted (``"attn.proj"``).
    ``input_of``: how to find a module's input among its call arguments (default: the first positional argument or
    ``hidden_states=``), one function for all or a mapping from attribute to function. ``timestep``: where the
    transformer's forward receives the timestep, a keyword name or a positional index (used only to notice a new
    generation in a hand-written loop). ``model_classes``: class names to serve if you ``register_adapter`` it.
    """

    def __init__(
        self,
        blocks: str | Sequence[nn.Module],
        modules: Mapping[str, str] | Sequence[tuple[str, str]],
        input_of: InputFn | Mapping[str, InputFn] = first_tensor_input,
        timestep: str | int = "timestep",
        model_classes: tuple[str, ...] = (),
    ) -> None:
        pairs = list(modules.items()) if isinstance(modules, Mapping) else [tuple(p) for p in modules]
        if not pairs:
            raise ConfigError("CustomAdapter needs at least one (attribute, kind) pair in modules")
        bad = [kind for _, kind in pairs if kind not in MODULE_KINDS]
        if bad:
            raise ConfigError(f"CustomAdapter module kinds must be in {MODULE_KINDS}, got {bad}")
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ConfigError("CustomAdapter blocks must be an attribute name or a sequence of blocks, not one module")
        self.blocks = blocks
        self.modules = pairs
        self.input_of = input_of
        self.timestep = timestep
        self.model_classes = tuple(model_classes)

    def _blocks(self, model: nn.Module) -> tuple[str, Sequence[nn.Module]]:
        if not isinstance(self.blocks, str):
            return "blocks", self.blocks
        try:
            return self.blocks, model.get_submodule(self.blocks)
        except AttributeError as err:
            raise ConfigError(f"{type(model).__name__} has no submodule {self.blocks!r} (CustomAdapter)") from err

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
                out.append(CachedModule(f"{prefix}.{i}.{attr}", module, kind, fn))
        missing = [attr for attr, ok in found.items() if not ok]
        if missing:
            raise ConfigError(f"no block of {type(model).__name__}.{prefix} has the module(s) {missing}")
        return out

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(self.timestep, int):
            return args[self.timestep] if len(args) > self.timestep else None
        return kwargs.get(self.timestep)
