"""Exceptions raised by relcache. All are ``ValueError``/``TypeError`` subclasses so callers can catch broadly."""

from __future__ import annotations

import math
import numbers
import operator


class ConfigError(ValueError):
    """A caching setting is out of range; the message names the parameter and the allowed values."""


class UnsupportedModelError(TypeError):
    """No adapter knows which modules of this model to cache."""


class AlreadyEnabledError(RuntimeError):
    """``enable`` was called on a model that already has caching enabled."""


class NotEnabledError(RuntimeError):
    """``disable`` or ``stats`` was called on a model without caching."""


def as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (Python, numpy, or a one-element integer tensor), else None.

    Booleans are not integers here (``True`` as a step count is a mistake, not a 1)."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is an integer in ``[low, high]`` (numpy and other integral types are accepted and
    returned as int, booleans are refused); otherwise raise a ConfigError naming ``name``."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    n = as_int(value)
    if n is None:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    if n < low or (high is not None and n > high):
        raise ConfigError(f"{name} must be {allowed}, got {n}")
    return n


def check_float(name: str, value: object, low: float | None = None, high: float | None = None,
                allowed: str | None = None) -> float:
    """``value`` as a float if it is a finite real number (numpy's too, not a boolean) in ``[low, high]``; otherwise
    raise a ConfigError naming ``name`` and ``allowed`` (by default the range)."""
    if allowed is None:
        bounds = [f"{op} {b}" for op, b in ((">=", low), ("<=", high)) if b is not None]
        allowed = " and ".join(["a finite number " + bounds[0], *bounds[1:]]) if bounds else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or (low is not None and x < low) or (high is not None and x > high):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    return x
