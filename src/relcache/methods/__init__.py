"""Methods: four predictors, two schedules, and the presets that name their pairs."""

from .config import FORA, RFC, CacheConfig, TaylorSeer
from .predictors import Linear, Predictor, Relational, Reuse, Taylor
from .schedules import InputError, Interval, Schedule

__all__ = [
    "FORA", "RFC", "CacheConfig", "InputError", "Interval", "Linear", "Predictor", "Relational", "Reuse",
    "Schedule", "Taylor", "TaylorSeer",
]
