"""relcache: training-free feature caching for diffusion transformers.

One line turns it on::

    import relcache
    relcache.enable(pipe, relcache.RFC(target_nfc=14))
    image = pipe(...)
    print(relcache.stats(pipe))

A method is a predictor (Reuse, Taylor, Relational, Linear) times a schedule (Interval, Steps, InputError);
FORA, TaylorSeer, RFC and FasterCache are presets naming such pairs; ``CFGCache`` adds skipping of the
unconditional half of classifier-free guidance to any of them.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

#: public name -> the module that defines it. Imported on first use (PEP 562), so that ``import relcache`` and the
#: ``relcache`` command's ``--help`` and option errors do not wait seconds for torch and diffusers; any of these
#: names (``relcache.enable`` first of all) imports ``relcache.models``, which registers the model adapters.
_LAZY = {
    **dict.fromkeys(("begin_generation", "cached", "disable", "enable", "is_enabled", "stats"), ".api"),
    **dict.fromkeys(("AlreadyEnabledError", "ConcurrentUseError", "ConfigError", "NotEnabledError",
                     "UnsupportedModelError"), ".errors"),
    **dict.fromkeys(("FORA", "RFC", "CacheConfig", "CacheStorage", "CFGCache", "FasterCache", "InputError",
                     "Interval", "Linear", "Relational", "Reuse", "Steps", "Taylor", "TaylorSeer"), ".methods"),
    "RFCPlus": ".methods.config",  # issue 19: beyond the paper (methods/plus.py, fit.py)
    "CustomAdapter": ".models",
    **dict.fromkeys(("CacheStats", "ContextStats"), ".runtime"),
}
_SUBPACKAGES = ("api", "cli", "errors", "evaluation", "methods", "models", "runtime")

if _TYPE_CHECKING:  # what type checkers and IDEs see: the same names from the same modules, imported at once
    from .api import begin_generation, cached, disable, enable, is_enabled, stats
    from .errors import AlreadyEnabledError, ConcurrentUseError, ConfigError, NotEnabledError, UnsupportedModelError
    from .methods import (
        FORA,
        RFC,
        CacheConfig,
        CacheStorage,
        CFGCache,
        FasterCache,
        InputError,
        Interval,
        Linear,
        Relational,
        Reuse,
        Steps,
        Taylor,
        TaylorSeer,
    )
    from .methods.config import RFCPlus
    from .models import CustomAdapter
    from .runtime import CacheStats, ContextStats


def __getattr__(name: str) -> _Any:
    """A public name or a subpackage, imported when first read and kept in the package's namespace."""
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))


__version__ = "0.1.0"

# literal, for linters and type checkers; tests/test_layering.py checks that it, ``_LAZY`` and the TYPE_CHECKING
# imports name the same names
__all__ = [
    "FORA", "RFC", "AlreadyEnabledError", "CacheConfig", "CacheStats", "CacheStorage", "CFGCache",
    "ConcurrentUseError", "ConfigError",
    "ContextStats", "CustomAdapter", "FasterCache", "InputError", "Interval", "Linear", "NotEnabledError", "RFCPlus",
    "Relational", "Reuse", "Steps", "Taylor", "TaylorSeer", "UnsupportedModelError", "begin_generation", "cached",
    "disable", "enable", "is_enabled", "stats",
]
