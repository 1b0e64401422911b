"""``PipelineWatch`` and ``MethodPatch`` (``runtime/watching.py``, ``runtime/patches.py``) and ``calling_pipeline``
(``runtime/callers.py``) on plain stand-in objects: which patches are set and removed, and what each reports."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from relcache.runtime.callers import calling_pipeline
from relcache.runtime.patches import MethodPatch, patching_hosts
from relcache.runtime.watching import PipelineWatch, timesteps_to_run


class Scheduler:
    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.arange(n)

    def set_begin_index(self, i: int) -> None:
        self.begin_index = i


class Pipeline:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def maybe_free_model_hooks(self) -> None:
        pass


def watcher(host: object = "host") -> tuple[PipelineWatch, list[tuple[str, object]]]:
    events: list[tuple[str, object]] = []
    watch = PipelineWatch(host, lambda s: events.append(("schedule", s)), lambda p: events.append(("end", p)))
    return watch, events


def test_set_timesteps_set_begin_index_and_the_end_of_call_are_reported_once():
    s = Scheduler()
    a, b = Pipeline(s), Pipeline(s)  # one scheduler shared by two watched pipelines: patched once
    watch, events = watcher()
    watch.watch(a)
    watch.watch(b)
    s.set_timesteps(3)
    s.set_begin_index(1)
    a.maybe_free_model_hooks()
    assert events == [("schedule", s), ("schedule", s), ("end", a)]


def test_a_pipeline_found_first_and_enabled_later_is_held_strongly():
    p = Pipeline(Scheduler())
    watch, _ = watcher()
    watch.watch(p, explicit=False)
    assert watch.watches(p) and not watch.watches(p, explicit=True) and watch.explicit() == []
    watch.watch(p)
    assert watch.watches(p, explicit=True) and watch.explicit() == [p]


def test_a_swapped_scheduler_is_patched_and_reported_and_a_shared_one_stays_patched():
    s, new = Scheduler(), Scheduler()
    a, b = Pipeline(s), Pipeline(s)
    watch, events = watcher()
    watch.watch(a)
    watch.watch(b)
    a.scheduler = new
    watch.check_swaps()
    assert events == [("schedule", new)]
    events.clear()
    new.set_timesteps(2)
    s.set_timesteps(2)  # still b's
    assert events == [("schedule", new), ("schedule", s)]


def test_unwatching_one_pipeline_leaves_a_scheduler_another_one_shares():
    s = Scheduler()
    a, b = Pipeline(s), Pipeline(s)
    watch, events = watcher()
    watch.watch(a)
    watch.watch(b)
    watch.unwatch(a)
    assert "maybe_free_model_hooks" not in vars(a)
    s.set_timesteps(2)
    assert events == [("schedule", s)]
    watch.unwatch(b)
    assert not any(isinstance(v, MethodPatch) for v in vars(s).values()) and "__getstate__" not in vars(s)


def test_two_hosts_on_one_pipeline_are_both_named_and_unlinked_in_any_order():
    s = Scheduler()
    p = Pipeline(s)
    first, _ = watcher("first")
    second, _ = watcher("second")
    first.watch(p)
    second.watch(p)
    assert patching_hosts(p) == ["second", "first"]
    first.unwatch(p)  # the inner wrapper first
    second.unwatch(p)
    assert vars(p) == {"scheduler": s}  # the class's method again, no instance attribute left


def test_an_instance_attribute_method_and_getstate_are_restored():
    class Plain:
        pass

    obj = Plain()
    obj.run = lambda: "own"
    obj.__getstate__ = lambda: {"mine": 1}
    owner = object()
    MethodPatch.set_on(obj, "run", lambda o: None, owner)
    assert obj.run() == "own"
    MethodPatch.unlink(obj, "run", owner)
    assert obj.run() == "own" and vars(obj)["__getstate__"]() == {"mine": 1}


def test_a_copy_of_a_patched_scheduler_is_plain():
    s = Scheduler()
    watch, events = watcher()
    watch.watch(Pipeline(s))
    twin = copy.copy(s)
    assert not any(isinstance(v, MethodPatch) for v in vars(twin).values())
    twin.set_timesteps(2)
    assert events == []


def test_timesteps_to_run_needs_one_dimension():
    assert timesteps_to_run(types.SimpleNamespace(timesteps=torch.zeros(2, 3))) is None


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


class _TwoExperts:
    def __init__(self, second: object) -> None:
        self.transformer = None
        self.transformer_2 = second

    def call(self, model: nn.Module, depth: int = 0) -> object:
        return _deep(model, depth)


def _deep(model: nn.Module, depth: int) -> object:
    return _deep(model, depth - 1) if depth else calling_pipeline(model)


def test_the_calling_pipeline_is_found_by_its_second_expert_through_wrappers_and_frames():
    model = nn.Linear(1, 1)
    pipe = _TwoExperts(_Wrapper(_Wrapper(model)))  # compiled twice
    found = pipe.call(model, depth=20)  # 20 frames between the pipeline's method and the call
    assert found is not None and found[0] is pipe
    assert _TwoExperts(nn.Linear(1, 1)).call(model) is None
