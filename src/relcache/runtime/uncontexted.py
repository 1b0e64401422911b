"""Names for the calls a pipeline makes without diffusers' ``cache_context``: each call of one step gets a context
of its own (``UncontextedCalls``), read by the step hook (``hooks.StepHook``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..errors import warn

DEFAULT_CONTEXT = "default"  # the call context when the pipeline sets none

#: this many calls of one step on the same inputs (more than the pipelines we know make: cond, uncond, one more guidance
#: call) is warned about once per enable and transformer: each is a context with caches of its own (+6 GiB a call
#: on FLUX.1 at 1024x1024)
MANY_CALLS = 4


class UncontextedCalls:
    """Names the calls a pipeline makes without ``cache_context``: ``"default"``, and ``"default.2"``,
    ``"default.3"``, ... for the second, third, ... call of one step.

    Many pipelines run true CFG as two transformer calls per step without naming them (Lumina2, Cosmos, Chroma,
    FLUX.1 Kontext, Krea 2, Kandinsky 5, Bria FIBO 2, JoyImage-Edit in diffusers 0.42): in one context their calls
    would count as two steps and forecast each from the other's outputs.

    (choice) A call belongs to the step of the previous call when its latents (``Adapter.hidden_of``) are the very
    tensor the previous call got, unchanged since (same object and version counter), and its timestep argument is the
    same (the same object, or equal values): a step's calls share the latents and the timestep, while every new step
    passes a new or rewritten tensor, or another timestep. Values are read only where the input tensor matched and
    the timestep is another tensor object (FLUX.1 Kontext divides it anew for each call): one host read per extra
    call of a step. Inference tensors have no version counter: there the latents' values are compared with a copy
    kept from the previous call once the same tensor came twice, and the timestep's when it is the same object (a
    static-buffer loop refills both in place): then a copy of the latents and one or two host reads per call.
    """

    def __init__(self) -> None:
        self._prev: weakref.ref | None = None
        self._version: int | None = None
        self._timestep: Any = None
        # inference tensors (no version counter): the latents' and the timestep's values, kept to compare
        self._latents: torch.Tensor | None = None
        self._value: torch.Tensor | None = None
        self._calls = 0  # calls of the current step so far
        self._warned = False  # ``MANY_CALLS`` was reached: said once per enable and transformer

    def forget(self) -> None:
        """The next call starts a step (a call raised, or the generation ended)."""
        self._prev, self._timestep, self._latents, self._value, self._calls = None, None, None, None, 0

    def name(self, x: Any, timestep: Any) -> str:
        """The context of a call with latents ``x`` (``Adapter.hidden_of``; None where it has none) and ``timestep``
        (``Adapter.timestep_of``)."""
        if not isinstance(x, torch.Tensor):
            self._prev, self._calls = None, 1
            return DEFAULT_CONTEXT
        try:
            version = x._version
        except RuntimeError:  # an inference tensor: no version counter
            version = None
        again = self._prev is not None and self._prev() is x  # the very tensor the previous call got
        same = again and version == self._version and _same_timestep(timestep, self._timestep)
        if same and version is None and x.is_meta:
            # meta tensors (a shape-only run, e.g. sizing caches) have no values to compare: each call is a step
            same = False
        elif same and version is None:
            # inference tensors: a static-buffer loop (CUDA graphs) refills the same latents and timestep in place,
            # and only their values tell its next step from another call of the same step (Heun repeats timesteps)
            if self._latents is not None:
                same = bool(torch.equal(x, self._latents))
            if same and timestep is self._timestep and isinstance(timestep, torch.Tensor):
                same = self._value is not None and bool(torch.equal(timestep, self._value))
        self._calls = self._calls + 1 if same else 1
        self._prev, self._version, self._timestep = weakref.ref(x), version, timestep
        # the latents' values are kept once the same inference tensor came twice (a static buffer, or a step's second
        # call), the timestep's always (small): a first repeat is told apart by the timestep alone
        self._latents = x.clone() if again and version is None else None
        self._value = timestep.clone() if version is None and isinstance(timestep, torch.Tensor) else None
        if self._calls == MANY_CALLS and not self._warned:
            self._warned = True
            warn(
                f"relcache: the transformer got the same latents tensor and timestep {MANY_CALLS} times in a row; each "
                "such call is taken as another call of the same step (true CFG's second call is the usual one) and "
                "gets a call context and caches of its own, so memory grows with every repeat. Name the calls with "
                "model.cache_context(...), or pass new latents or another timestep for each step (timing one step "
                "by calling the transformer again and again on the same inputs does this)", RuntimeWarning)
        return DEFAULT_CONTEXT if self._calls == 1 else f"{DEFAULT_CONTEXT}.{self._calls}"


def _same_timestep(a: Any, b: Any) -> bool:
    """Whether two calls' timestep arguments are the same: the same object, or equal values (a tensor's read only
    here, where the input tensor already matched: one host read per extra call of a step)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.device == b.device and not a.is_meta and bool(torch.equal(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return False
