"""Exceptions raised by relcache. All are ``ValueError``/``TypeError`` subclasses so callers can catch broadly."""

from __future__ import annotations

import importlib.util
import math
import numbers
import operator
import os
import sys
import warnings


class ConfigError(ValueError):
    """A caching setting is out of range; the message names the parameter and the allowed values."""


class UnsupportedModelError(TypeError):
    """No adapter knows which modules of this model to cache."""


class AlreadyEnabledError(RuntimeError):
    """``enable`` was called on a model that already has caching enabled."""


class NotEnabledError(RuntimeError):
    """``disable`` or ``stats`` was called on a model without caching."""


class ConcurrentUseError(RuntimeError):
    """An enabled transformer was called from a thread other than the one running its generation: relcache keeps one
    generation per enabled transformer, so two threads' generations would mix their caches and steps."""


def _package_dirs() -> tuple[str, ...]:
    """The folders of relcache and of the libraries it is called through, and contextlib's file (``with
    relcache.cached(...)`` ends in it): a user's frame is outside all of them."""
    import contextlib

    dirs = [os.path.dirname(os.path.abspath(__file__))]
    for name in ("torch", "diffusers", "accelerate", "transformers"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
    return (*(d + os.sep for d in dirs), os.path.abspath(contextlib.__file__))


_INTERNAL: tuple[str, ...] | None = None


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first caller outside relcache, torch, diffusers,
    accelerate, transformers and contextlib. (A fixed ``stacklevel`` named a line inside the hooks, so Python's
    once-per-line filter hid the warning from every later model and generation.)"""
    global _INTERNAL
    if _INTERNAL is None:
        _INTERNAL = _package_dirs()
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)


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
