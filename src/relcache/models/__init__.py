"""Models: adapters that say which modules of a transformer to cache, and the shipped reference model."""

from . import dit  # noqa: F401  (registers the DiT adapter)
from .base import Adapter, CachedModule, find_adapter, register_adapter, supported_models

__all__ = ["Adapter", "CachedModule", "find_adapter", "register_adapter", "supported_models"]
