"""Exceptions raised by relcache. All are ``ValueError``/``TypeError`` subclasses so callers can catch broadly."""

from __future__ import annotations


class ConfigError(ValueError):
    """A caching setting is out of range; the message names the parameter and the allowed values."""


class UnsupportedModelError(TypeError):
    """No adapter knows which modules of this model to cache."""


class AlreadyEnabledError(RuntimeError):
    """``enable`` was called on a model that already has caching enabled."""


class NotEnabledError(RuntimeError):
    """``disable`` or ``stats`` was called on a model without caching."""


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``; otherwise raise a ConfigError naming ``name``."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must be {allowed}, got {value}")
    return value
