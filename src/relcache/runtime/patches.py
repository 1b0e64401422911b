"""Method wrappers that relcache sets on a watched pipeline or scheduler (``watching.PipelineWatch`` sets them;
``generations.Generations`` starts and ends generations through them), and the sessions a pipeline's wrappers
belong to."""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable
from typing import Any


def patching_hosts(pipeline: Any) -> list[Any]:
    """The hosts (sessions) whose generations patched ``pipeline``'s end of call: the ones watching it, whether or
    not its current transformer is theirs (``pipe.transformer`` replaced since ``enable``)."""
    hosts, cur = [], vars(pipeline).get("maybe_free_model_hooks") if hasattr(pipeline, "__dict__") else None
    while isinstance(cur, MethodPatch):
        hosts.append(getattr(cur.owner, "host", None))
        cur = cur.next
    return [h for h in hosts if h is not None]


class MethodPatch:
    """A method wrapper set on one object (a scheduler or pipeline): calls the method, then ``after(obj)``.

    Wrappers of several enabled models sharing one object chain, and each unlinks itself wherever it sits
    (``unlink``), so any order of ``disable`` restores the object. A deep copy of the object (some pipelines copy
    their scheduler) gets the unwrapped method, bound to the copy, not a wrapper acting on the original.
    """

    def __init__(self, obj: Any, name: str, after: Callable[[Any], None], owner: object) -> None:
        self.obj, self.after, self.owner = obj, after, owner
        self.had_attr = name in vars(obj)  # whether ``next`` is an instance attribute (else the class's method)
        self.next = getattr(obj, name)
        functools.update_wrapper(self, self.next, updated=())  # name and docstring; not another MethodPatch's fields

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.next(*args, **kwargs)
        self.after(self.obj)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.next, memo)

    @staticmethod
    def set_on(obj: Any, name: str, after: Callable[[Any], None], owner: object) -> None:
        """Wrap ``obj.name`` with ``owner``'s wrapper, and keep copies of ``obj`` plain (``_StateWithoutPatches``)."""
        setattr(obj, name, MethodPatch(obj, name, after, owner))
        if not isinstance(vars(obj).get("__getstate__"), _StateWithoutPatches):
            vars(obj)["__getstate__"] = _StateWithoutPatches(obj, vars(obj).get("__getstate__"))

    @staticmethod
    def unlink(obj: Any, name: str, owner: object) -> None:
        """Remove ``owner``'s wrapper from ``obj.name``'s chain; the method is as before once no wrapper is left."""
        prev, cur = None, vars(obj).get(name)
        while isinstance(cur, MethodPatch):
            if cur.owner is owner:
                if prev is not None:
                    prev.next, prev.had_attr = cur.next, cur.had_attr
                elif cur.had_attr:
                    setattr(obj, name, cur.next)
                else:
                    vars(obj).pop(name, None)
                break
            prev, cur = cur, cur.next
        state = vars(obj).get("__getstate__")
        if isinstance(state, _StateWithoutPatches) and not any(isinstance(v, MethodPatch) for v in vars(obj).values()):
            if state.had is None:
                del vars(obj)["__getstate__"]
            else:
                vars(obj)["__getstate__"] = state.had


class _StateWithoutPatches:
    """``obj.__getstate__`` while a wrapper of ours sits on ``obj``: ``copy.copy``, ``copy.deepcopy`` and ``pickle``
    read an object's state through it, so a copy gets the plain methods, not wrappers acting on the original (found
    by review: a shallow copy of a watched scheduler set the original's timesteps, even after ``disable``)."""

    def __init__(self, obj: Any, had: Any) -> None:
        self._obj = weakref.ref(obj)
        self.had = had  # an instance attribute of that name that was there before (rare)

    def __call__(self) -> Any:
        obj = self._obj()
        state = self.had() if self.had is not None else type(obj).__getstate__(obj)
        if not isinstance(state, dict):
            return state
        return {k: v for k, v in state.items() if not isinstance(v, (MethodPatch, _StateWithoutPatches))}
