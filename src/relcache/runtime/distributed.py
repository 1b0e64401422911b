"""Context parallelism: what relcache reduces over tokens is reduced over the whole sequence (docs/distributed.md).

Under diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``) each
process of the context-parallel group holds a slice of every sequence, and each cached module sees only its slice.
Caching is elementwise except for a few per-sample norms over tokens: RCS's input error, RFE's ratio and its input
change. ``SequenceReducer`` sums their per-sample partial sums over the group (never the world group: data-parallel
ranks hold other samples), so that every process computes one process's arithmetic and takes the same decision.

Collectives (each one ``all_reduce`` of a few numbers per sample, in float64):

* one per call context per generation, at its first call, before anything that reads the step count (a
  ``target_nfc`` budget, ``Steps``, CFG-Cache's window): the guard alone (``agree``), so that a setting only one
  process refuses raises on every process instead of leaving the others waiting in the step's collective;
* one per step, at the step's decision: RCS's two L1 norms, the RFE ratios recorded at the previous full step
  (deferred to it, ``later``), and a guard: every process's (configuration, context, step, full steps so far,
  decision) laid out one row per process, so a disagreement raises ``ContextParallelMismatch`` on every process,
  before the forward's own collectives could hang on it;
* one per cached module at an RFE cached step: the norms of its input change and of its Taylor direction.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..methods.storage import CacheStorage, is_scaled

#: what each process writes into the guard: configuration, context, step, full steps so far, latest full step,
#: decision (1 full, 0 cached, -1 not taken yet), collective number in the generation, numbers summed
GUARD_FIELDS = ("config", "context", "steps", "step", "full steps", "latest full", "decision", "collective",
                "numbers")


class ContextParallelMismatch(RuntimeError):
    """The processes of a context-parallel group disagree on a step (they would otherwise hang in a collective)."""


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()))


class SequenceReducer:
    """Sums per-sample partial sums over ``group``, the processes that each hold a slice of the sequence
    (``relcache.methods.history.Reducer``). One reducer per enabled model; ``config_repr`` names the caching
    configuration in the guard, so processes enabled with different settings fail at the first step."""

    def __init__(self, group: Any, config_repr: str = "", after_split: bool = False) -> None:
        self.group = group
        self.after_split = after_split  # made once diffusers' context parallelism was on (its split hook is outside)
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._config_repr = re.sub(r" at 0x[0-9a-fA-F]+", "", config_repr)  # a callable's address differs per process
        self._config = _crc(self._config_repr)
        self._context = ""  # the context of the step being guarded, for the mismatch's message
        self._pending: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
        self._guard: list[float] | None = None  # the step's guard, sent with the step's first collective
        self._collectives = 0  # in this generation
        self._device = torch.device("cpu")  # where the step's tensors are: a collective's buffer goes there

    def reset(self) -> None:
        """A new generation: forget deferred sums (their states are gone) and restart the count."""
        self._pending = []
        self._guard = None
        self._collectives = 0

    # -- the step's decision (steps.decide) ----------------------------------------------------------------------
    def begin_step(self, context: str, step: int, full_steps: list[int], like: torch.Tensor,
                   num_steps: int | None = None) -> None:
        """A step of ``context`` is about to be decided (``like``: a tensor of the call, for the device; ``num_steps``:
        the generation's announced length, -1 where unknown): the next collective carries the guard."""
        self._device, self._context = like.device, context
        latest = full_steps[-1] if full_steps else -1
        steps = -1.0 if num_steps is None else float(num_steps)
        self._guard = [self._config, _crc(context), steps, float(step), float(len(full_steps)), float(latest), -1.0]

    def end_decision(self, full: bool) -> None:
        """The step is decided. If the decision made no collective (a schedule that reads no input, or RCS in
        warm-up), one is made now for the guard, with the decision in it, and any deferred sums."""
        if self._guard is not None:
            self._guard[6] = float(full)
            self.sum(torch.zeros(0, 0))

    def agree(self, context: str, num_steps: int | None, like: torch.Tensor) -> None:
        """The first call of ``context`` in a generation, before any per-process check of its settings: one
        collective of fixed size (the guard, nothing summed; deferred sums wait for the step's own) comparing the
        configuration, the context and the announced step count. Where they differ, a check one process alone would
        fail (``target_nfc`` above the step count) would raise there and leave the others waiting in the step's
        collective until its timeout (found by review): every process raises ``ContextParallelMismatch`` instead."""
        steps = -1.0 if num_steps is None else float(num_steps)
        self._context = context
        buffer = self._guard_rows([self._config, _crc(context), steps, -1.0, 0.0, -1.0, -1.0], 0).to(like.device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        self._check(buffer.reshape(self.size, len(GUARD_FIELDS)).tolist())

    def _guard_rows(self, guard: list[float], numbers: int) -> torch.Tensor:
        """The guard's rows, flat: this process's row (``guard``, the collective's number, ``numbers`` summed) and
        zeros in the others', which the sum fills in."""
        self._collectives += 1
        rows = torch.zeros(self.size, len(GUARD_FIELDS), dtype=torch.float64)
        rows[self.rank] = torch.tensor([*guard, float(self._collectives), float(numbers)], dtype=torch.float64)
        return rows.reshape(-1)

    # -- the sums (relcache.methods.history.Reducer) -----------------------------------------------------------
    def later(self, partials: torch.Tensor, done: Callable[[torch.Tensor], None]) -> None:
        self._pending.append((partials, done))

    def sum(self, partials: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, []
        guard, self._guard = self._guard, None
        parts = [partials, *(p for p, _ in pending)]
        device = partials.device if partials.numel() else self._device
        flat = [p.reshape(-1).to(device, torch.float64) for p in parts]
        numbers = sum(f.numel() for f in flat)
        if guard is not None:
            flat.append(self._guard_rows(guard, numbers).to(device))
        buffer = torch.cat(flat)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        if guard is not None:
            self._check(buffer[numbers:].reshape(self.size, len(GUARD_FIELDS)).tolist())
        sums = buffer[:numbers].split([f.numel() for f in flat[: len(parts)]])
        for (p, done), s in zip(pending, sums[1:], strict=True):
            done(s.reshape(p.shape).to(p.device, p.dtype))  # a model split over devices: where its module is
        return sums[0].reshape(partials.shape).to(partials.dtype)

    def _check(self, rows: list[list[float]]) -> None:
        """Raise on every process where the rows differ, saying which fields differ and, for the configuration and
        the context (sent as checksums), what this process had (found by review: checksums alone said nothing)."""
        if all(row == rows[0] for row in rows):
            return
        differ = [name for i, name in enumerate(GUARD_FIELDS) if len({row[i] for row in rows}) > 1]
        seen = "; ".join(
            f"rank {r}: " + ", ".join(f"{name} {v:.0f}" for name, v in zip(GUARD_FIELDS, row, strict=True))
            for r, row in enumerate(rows)
        )
        mine = []
        if "config" in differ:
            mine.append(f"its configuration and enable() settings {self._config_repr}")
        if "context" in differ:
            mine.append(f"call context {self._context!r}")
        said = f" This process (rank {self.rank}) had " + " and ".join(mine) + "." if mine else ""
        raise ContextParallelMismatch(
            "relcache: the processes of the context-parallel group disagree on this step, so their collectives "
            "would not match (the same relcache configuration and enable() settings, the same pipeline call "
            f"and the same inputs on every process are required). They differ in {', '.join(differ)}.{said} "
            f"Each rank's guard (config and context as checksums): {seen}"
        )


def context_parallel_group(model: nn.Module) -> Any:
    """The process group of diffusers' context parallelism on ``model`` (``enable_parallelism`` with a
    ``ContextParallelConfig``: its ring x Ulysses mesh, flattened), or None when the model has none."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()


def reducer_for(model: nn.Module, group: Any, config_repr: str) -> SequenceReducer | None:
    """The reducer for ``model``: over ``group`` when given (e.g. xDiT's sequence-parallel group), else over
    diffusers' context-parallel group, else None (one process holds whole sequences)."""
    split = context_parallel_group(model)
    group = split if group is None else group
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return SequenceReducer(group, config_repr, after_split=split is not None)


def check_split_storage(reducer: SequenceReducer | None, storage: CacheStorage | None) -> None:
    """Refuse scaled storage whose scales span tokens (``scale="sample"`` or ``"channel"``) on a split sequence: each
    process would scale its own slice, and the results would differ from one process (found by review)."""
    st = storage
    if reducer is not None and st is not None and st.scale != "token" and any(
            is_scaled(f) for f in (st.base, st.diffs, st.input)):
        raise ConfigError(
            f"CacheStorage(scale={st.scale!r}) takes its scales over tokens, which context parallelism splits over "
            "processes (each would scale its own slice): use scale='token' with context parallelism")


def check_enable_order(model: nn.Module, reducer: SequenceReducer | None) -> None:
    """Refuse a model whose context parallelism was enabled after relcache: relcache's step hook would run inside
    diffusers' split hook, on a slice of the call's inputs (also where a ``sequence_group`` was given to ``enable``)."""
    if (reducer is None or not reducer.after_split) and context_parallel_group(model) is not None:
        raise ConfigError(
            f"relcache was enabled on this {type(model).__name__} before transformer.enable_parallelism(...): call "
            "transformer.enable_parallelism(config=ContextParallelConfig(...)) first, then relcache.enable(...) "
            "(relcache.disable(...) and enable it again after enable_parallelism)"
        )
