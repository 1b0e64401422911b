"""The pipelines that drive one enabled model, and the method patches through which they start and end its
generations: a watched scheduler's ``set_timesteps`` and ``set_begin_index``, a watched pipeline's end of call
(``maybe_free_model_hooks``). What a start or an end means is ``generations.Generations``' to say; this module only
keeps the pipelines, their schedulers and the patches in step with each other."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .patches import MethodPatch


def steps_to_run(scheduler: Any) -> int | None:
    """Transformer calls per context the scheduler's timesteps will take: those from its begin index on."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    return max(len(timesteps) - int(begin), 0)


def timesteps_to_run(scheduler: Any) -> torch.Tensor | None:
    """The timesteps the scheduler will run, from its begin index on (what ``batch_modulation`` tabulates), or None."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1:
        return None
    return timesteps[int(getattr(scheduler, "begin_index", None) or 0):]


@dataclass
class Watched:
    """One watched pipeline: held strongly when ``enable`` was given it, weakly when found driving the model."""

    ref: weakref.ref
    strong: Any  # the pipeline itself when enabled explicitly, else None
    scheduler: Any  # the scheduler whose methods are patched for it

    @property
    def pipeline(self) -> Any:
        return self.ref()


class PipelineWatch:
    """The watched pipelines of one enabled model (``host``, the session: ``patches.patching_hosts`` reads it) and
    the patches set for them: ``on_schedule(scheduler)`` runs after a watched scheduler set its timesteps or begin
    index, and when a scheduler swapped into a watched pipeline is noticed; ``on_end(pipeline)`` after a watched
    pipeline's end of call."""

    def __init__(self, host: Any, on_schedule: Callable[[Any], None], on_end: Callable[[Any], None]) -> None:
        self.host = host
        self._on_schedule = on_schedule
        self._on_end = on_end
        self._watched: list[Watched] = []
        self._patches: list[tuple[weakref.ref, str]] = []  # (object, method name) wrapped by a MethodPatch of ours

    def watch(self, pipeline: Any, *, explicit: bool = True) -> None:
        """Patch ``pipeline`` and its scheduler; ``explicit`` (``enable`` was given it) holds it strongly, else
        weakly (found driving the model)."""
        self._watched = [w for w in self._watched if w.pipeline is not None]
        self._patches = [e for e in self._patches if e[0]() is not None]
        found = self.find(pipeline)
        if found is not None:
            found.strong = found.strong if found.strong is not None or not explicit else pipeline
            return
        self._watched.append(Watched(weakref.ref(pipeline), pipeline if explicit else None, None))
        self._patch(pipeline, "maybe_free_model_hooks", self._on_end)
        self._patch_scheduler(self._watched[-1], getattr(pipeline, "scheduler", None))

    def watches(self, pipeline: Any, *, explicit: bool = False) -> bool:
        """Whether ``pipeline`` is watched (``explicit``: because ``enable`` was given it)."""
        found = self.find(pipeline)
        return found is not None and (not explicit or found.strong is not None)

    def find(self, pipeline: Any) -> Watched | None:
        """``pipeline``'s entry, if watched."""
        return next((w for w in self._watched if w.pipeline is pipeline), None)

    def explicit(self) -> list[Any]:
        """The pipelines ``enable`` was given (held strongly)."""
        return [w.strong for w in self._watched if w.strong is not None]

    def check_swaps(self) -> None:
        """``check_swap`` for every watched pipeline (a call from no pipeline: any of them may have swapped)."""
        for watched in list(self._watched):
            self.check_swap(watched)

    def check_swap(self, watched: Watched) -> None:
        """A scheduler swapped into ``watched``'s pipeline since it was patched (``pipe.scheduler = ...``) set its
        timesteps unpatched: patch it (unpatching the old one unless another watched pipeline shares it), and report
        its schedule."""
        pipeline = watched.pipeline
        if pipeline is None:
            return
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is not watched.scheduler:
            old, watched.scheduler = watched.scheduler, None
            if old is not None and not any(w.scheduler is old for w in self._watched):
                self._unpatch(old)
            self._patch_scheduler(watched, scheduler)
            self._on_schedule(scheduler)

    def unwatch_all(self) -> None:
        """Remove every patch, leaving the pipelines and their schedulers as they were."""
        while self._patches:
            obj = self._patches[0][0]()
            if obj is None:
                self._patches.pop(0)
            else:
                self._unpatch(obj)
        self._watched = []

    def unwatch(self, pipeline: Any) -> None:
        """Stop watching ``pipeline`` alone: its patches go, and its scheduler's unless another watched pipeline
        shares that scheduler."""
        found = self.find(pipeline)
        if found is None:
            return
        self._watched.remove(found)
        self._unpatch(pipeline)
        if found.scheduler is not None and all(w.scheduler is not found.scheduler for w in self._watched):
            self._unpatch(found.scheduler)

    def _patch_scheduler(self, watched: Watched, scheduler: Any) -> None:
        """``set_timesteps`` (every pipeline calls it first) and ``set_begin_index`` (img2img pipelines skip the
        first timesteps with it, after ``set_timesteps``) start a generation of the steps that will run. A scheduler
        shared by two watched pipelines is patched once."""
        shared = scheduler is not None and any(w.scheduler is scheduler for w in self._watched)
        watched.scheduler = scheduler
        if scheduler is None or shared:
            return
        self._patch(scheduler, "set_timesteps", self._on_schedule)
        self._patch(scheduler, "set_begin_index", self._on_schedule)

    def _patch(self, obj: Any, name: str, after: Callable[[Any], None]) -> None:
        """Wrap ``obj.name`` (a method) so that ``after(obj)`` runs after it; ``unwatch`` unlinks the wrapper."""
        if not callable(getattr(obj, name, None)):
            return
        MethodPatch.set_on(obj, name, after, self)
        self._patches.append((weakref.ref(obj), name))

    def _unpatch(self, obj: Any) -> None:
        """Unlink our wrappers of ``obj``'s methods, wherever they sit in a chain of wrappers."""
        for entry in [e for e in self._patches if e[0]() is obj]:
            MethodPatch.unlink(obj, entry[1], self)
            self._patches.remove(entry)
