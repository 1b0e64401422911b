"""relcache: training-free feature caching for diffusion transformers.

One line turns it on::

    import relcache
    relcache.enable(pipe, relcache.RFC(target_nfc=14))
    image = pipe(...)
    print(relcache.stats(pipe))

A method is a predictor (Reuse, Taylor, Relational, Linear) times a schedule (Interval, InputError);
FORA, TaylorSeer, RFC and FasterCache are presets naming such pairs; ``CFGCache`` adds skipping of the
unconditional half of classifier-free guidance to any of them.
"""

from . import models  # noqa: F401  (registers the model adapters)
from .api import begin_generation, cached, disable, enable, is_enabled, stats
from .errors import AlreadyEnabledError, ConfigError, NotEnabledError, UnsupportedModelError
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
from .methods.config import RFCPlus  # issue 19: beyond the paper (methods/plus.py, fit.py)
from .models import CustomAdapter
from .runtime import CacheStats, ContextStats

__version__ = "0.1.0"

__all__ = [
    "FORA", "RFC", "AlreadyEnabledError", "CacheConfig", "CacheStats", "CacheStorage", "CFGCache", "ConfigError",
    "ContextStats", "CustomAdapter",
    "FasterCache", "InputError", "Interval", "Linear", "NotEnabledError", "Relational", "Reuse", "Taylor", "TaylorSeer",
    "UnsupportedModelError", "begin_generation", "cached", "disable", "enable", "is_enabled", "stats",
]
__all__ += ["RFCPlus", "Steps"]
