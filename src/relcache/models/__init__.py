"""Models: adapters that say which modules of a transformer to cache, one file per model family.

Every module in this folder except ``base`` is imported here (packages are not), and each registers its adapter
on import, so adding a model family is adding one file (docs/custom-models.md).
"""

import importlib
import pkgutil

from .base import Adapter, CachedModule, find_adapter, register_adapter, supported_models
from .custom import CustomAdapter

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.ispkg and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Adapter", "CachedModule", "CustomAdapter", "find_adapter", "register_adapter", "supported_models"]
