"""Methods: four predictors, two schedules, CFG-Cache, and the presets that name their pairs."""

from .cfg_cache import CFGCache
from .config import FORA, RFC, CacheConfig, FasterCache, TaylorSeer
from .predictors import Linear, Predictor, Relational, Reuse, Taylor
from .schedules import InputError, Interval, Schedule, Steps
from .storage import CacheStorage

__all__ = [
    "FORA", "RFC", "CFGCache", "CacheConfig", "CacheStorage", "FasterCache", "InputError", "Interval", "Linear",
    "Predictor", "Relational", "Reuse", "Schedule", "Steps", "Taylor", "TaylorSeer",
]
