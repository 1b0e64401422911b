"""Every rule of when a generation starts and ends, in one place.

A generation is one sampling run: its steps share caches, a step count and a budget.

* Enabled on a pipeline, the scheduler's ``set_timesteps`` (which every diffusers pipeline calls first) starts a
  new generation and announces its number of steps; ``set_begin_index`` (img2img pipelines skip the first
  timesteps with it) announces the steps that will actually run. A scheduler swapped into the pipeline after
  ``enable`` is noticed at the next transformer call, which then starts a generation.
* The end of a pipeline call ends the generation and frees the caches (the stats stay readable): every pipeline
  calls ``maybe_free_model_hooks`` at the end of ``__call__``, and transformers with diffusers' ``CacheMixin``
  also reset their stateful hooks then (``hooks.StepHook.reset_state``). The next step starts a new generation.
* In a hand-written loop, ``relcache.begin_generation`` starts one. Failing that, a transformer call whose step
  index (diffusers' ``cache_context`` step) is not past its context's, or whose timestep is larger than the
  previous one in the same context, starts one. The timestep rule holds only while no generation has been
  marked (by the scheduler or by ``begin_generation``): after a mark, on every device, only marks and the end of
  a pipeline call start generations. So marked loops never wait for a GPU timestep (reading one is a host sync
  per step), and a marked loop whose timesteps rise (DDIM inversion) is one generation.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..errors import check_int
from ..models.base import Adapter


class GenerationHost(Protocol):
    """What the generation rules ask of the runtime."""

    def reset_generation(self) -> None:
        """Drop every context's state: a new generation starts."""

    def free_caches(self) -> None:
        """Free the cached tensors; keep what the stats read."""


def checked_num_steps(num_steps: Any) -> int | None:
    """``num_steps`` as an int >= 1 (numpy and 0-d integer tensors too), or None; floats and bools are refused."""
    return None if num_steps is None else check_int("num_steps", num_steps, 1)


def steps_to_run(scheduler: Any) -> int | None:
    """Transformer calls per context the scheduler's timesteps will take: those from its begin index on."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    return max(len(timesteps) - int(begin), 0)


def _as_float(t: Any) -> float | None:
    """The timestep as a number, or None."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class Generations:
    """The generation lifecycle of one enabled model: marks, ends, the step count, and the pipeline patches."""

    def __init__(self, host: GenerationHost, adapter: Adapter) -> None:
        self.host = host
        self.adapter = adapter
        self.num_steps: int | None = None
        self.marked = False  # a generation was marked (scheduler or begin_generation): timesteps stay unread
        self.ended = False  # the last generation ended: the next step starts a new one
        self._pipeline: Any = None  # enabled on a pipeline: its scheduler is watched for a swap
        self._scheduler: Any = None  # the scheduler whose methods are patched
        self._patches: list[tuple[Any, str]] = []  # (object, method name) wrapped by a _Patch of ours

    def begin(self, num_steps: int | None = None, *, marked: bool = False) -> None:
        """Start a new generation; ``marked`` when the caller announced it (scheduler or public API), not when
        the runtime noticed it."""
        self.ended = False
        self.marked = self.marked or marked
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.host.reset_generation()

    def end(self) -> None:
        """A pipeline call ended: free the cached tensors, keep the stats readable, start anew at the next step."""
        self.host.free_caches()
        self.ended = True

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """The call's timestep while no generation was marked, else None: once marked it is not read on any device
        (on an accelerator reading it is a host sync; a device-dependent rule would make a marked loop behave
        differently on CPU and GPU)."""
        return None if self.marked else _as_float(self.adapter.timestep_of(args, kwargs))

    def starts_new(self, last: tuple[int, float | None] | None, step_index: int | None,
                   timestep: float | None) -> bool:
        """Whether a call starts a new generation; ``last`` is its context's (step, timestep) so far, if any."""
        if self.ended:
            return True
        if last is None:
            return False
        step, last_timestep = last
        return (step_index is not None and step_index <= step) or (
            timestep is not None and last_timestep is not None and timestep > last_timestep
        )

    # -- the pipeline's announcements --------------------------------------------------------------------------
    def watch(self, pipeline: Any) -> None:
        """Patch ``pipeline`` so that its scheduler starts generations and the end of its call ends them."""
        self._pipeline = pipeline
        self._patch(pipeline, "maybe_free_model_hooks", lambda _: self.end())
        self._patch_scheduler(getattr(pipeline, "scheduler", None))

    def check_scheduler(self) -> None:
        """At each transformer call: a scheduler swapped into the pipeline since enable (``pipe.scheduler =
        ...from_config(...)``) set its timesteps unpatched, so this call starts its generation."""
        if self._pipeline is None:
            return
        scheduler = getattr(self._pipeline, "scheduler", None)
        if scheduler is not self._scheduler:
            if self._scheduler is not None:
                self._unpatch(self._scheduler)
            self._patch_scheduler(scheduler)
            self._new_schedule(scheduler)

    def unwatch(self) -> None:
        """Remove every patch, leaving the pipeline and its scheduler as they were."""
        while self._patches:
            self._unpatch(self._patches[0][0])
        self._scheduler = None
        self._pipeline = None

    def _patch_scheduler(self, scheduler: Any) -> None:
        """``set_timesteps`` (every pipeline calls it first) and ``set_begin_index`` (img2img pipelines skip the
        first timesteps with it, after ``set_timesteps``) start a generation of the steps that will run."""
        self._scheduler = scheduler
        if scheduler is None:
            return
        self._patch(scheduler, "set_timesteps", self._new_schedule)
        self._patch(scheduler, "set_begin_index", self._new_schedule)

    def _new_schedule(self, scheduler: Any) -> None:
        self.begin(steps_to_run(scheduler), marked=True)

    def _patch(self, obj: Any, name: str, after: Callable[[Any], None]) -> None:
        """Wrap ``obj.name`` (a method) so that ``after(obj)`` runs after it; ``unwatch`` unlinks the wrapper."""
        if not callable(getattr(obj, name, None)):
            return
        setattr(obj, name, _Patch(obj, name, after, self))
        self._patches.append((obj, name))

    def _unpatch(self, obj: Any) -> None:
        """Unlink our wrappers of ``obj``'s methods, wherever they sit in a chain of wrappers."""
        for entry in [e for e in self._patches if e[0] is obj]:
            _Patch.unlink(obj, entry[1], self)
            self._patches.remove(entry)


class _Patch:
    """A method wrapper set on one object (a scheduler or pipeline): calls the method, then ``after(obj)``.

    Wrappers of several enabled models sharing one object chain, and each unlinks itself wherever it sits
    (``unlink``), so any order of ``disable`` restores the object. A deep copy of the object (some pipelines copy
    their scheduler) gets the unwrapped method, bound to the copy, not a wrapper acting on the original.
    """

    def __init__(self, obj: Any, name: str, after: Callable[[Any], None], owner: object) -> None:
        self.obj, self.after, self.owner = obj, after, owner
        self.had_attr = name in vars(obj)  # whether ``next`` is an instance attribute (else the class's method)
        self.next = getattr(obj, name)
        functools.update_wrapper(self, self.next, updated=())  # name and docstring; not another _Patch's fields

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.next(*args, **kwargs)
        self.after(self.obj)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.next, memo)

    @staticmethod
    def unlink(obj: Any, name: str, owner: object) -> None:
        """Remove ``owner``'s wrapper from ``obj.name``'s chain; the method is as before once no wrapper is left."""
        prev, cur = None, vars(obj).get(name)
        while isinstance(cur, _Patch):
            if cur.owner is owner:
                if prev is not None:
                    prev.next, prev.had_attr = cur.next, cur.had_attr
                elif cur.had_attr:
                    setattr(obj, name, cur.next)
                else:
                    vars(obj).pop(name, None)
                return
            prev, cur = cur, cur.next
