"""Models: adapters that say which modules of a transformer to cache.

Most families are one declarative ``ModelRow`` in ``families.py``, read by the generic ``TableAdapter`` through the
shape table in ``base``; a family that needs code has its own file (dit.py, flux.py, sd3.py). Every module in this
folder except ``base`` is imported here (packages are not), and each registers its adapters on import
(docs/custom-models.md).
"""

import importlib
import pkgutil

from .base import Adapter, CachedModule, find_adapter, register_adapter, supported_models
from .custom import CustomAdapter

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.ispkg and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Adapter", "CachedModule", "CustomAdapter", "find_adapter", "register_adapter", "supported_models"]
