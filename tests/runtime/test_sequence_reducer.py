"""``SequenceReducer``'s arithmetic and guard, checked in one process: a context-parallel group of threads whose
``all_reduce`` sums their buffers (``_ThreadGroup``), so the guard's layout, the deferred sums and the mismatch's
message are checked against hand-computed numbers without gloo processes (tests/runtime/test_context_parallel.py
runs the real thing, slowly). Also the checks around it: ``reducer_for``'s group and ``check_split_storage``."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import relcache
from relcache.runtime import distributed
from relcache.runtime.distributed import GUARD_FIELDS, ContextParallelMismatch, SequenceReducer


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()))


class _ThreadGroup:
    """``size`` threads standing for the processes of a group: ``all_reduce`` sums their buffers (and keeps what
    each sent, in ``sent[rank]``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=10)
        self.buffers: list[torch.Tensor | None] = [None] * size
        self.sent: list[list[torch.Tensor]] = [[] for _ in range(size)]
        self.local = threading.local()

    def all_reduce(self, buffer: torch.Tensor, op: Any = None, group: Any = None) -> None:
        assert group is self
        rank = self.local.rank
        self.buffers[rank] = buffer.clone()
        self.sent[rank].append(buffer.clone())
        self.barrier.wait()
        total = torch.stack(self.buffers).sum(0)
        self.barrier.wait()
        buffer.copy_(total)

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(rank)`` on every rank at once; what each returned, or the exception it raised."""
        out: list[Any] = [None] * self.size

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                out[rank] = fn(rank)
            except Exception as e:  # noqa: BLE001 - returned to the test
                out[rank] = e

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch) -> _ThreadGroup:
    g = _ThreadGroup(2)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group: group.size)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group: group.local.rank)
    monkeypatch.setattr(distributed.dist, "all_reduce", g.all_reduce)
    return g


def _rows(buffer: torch.Tensor, size: int = 2) -> list[list[float]]:
    return buffer[-size * len(GUARD_FIELDS):].reshape(size, -1).tolist()


def test_the_guard_carries_each_processs_row_and_the_numbers_are_summed(group: _ThreadGroup) -> None:
    """Rank r sends its per-sample partials ((r+1) * [1, 2, 3]) then the guard: its own row (configuration and context
    checksums, announced steps 8, step 5, 2 full steps, the latest full step 3, the decision -1 not taken yet, the
    collective's number 1 in the generation, 3 numbers summed), zeros in the other's. The sum is [3, 6, 9] in the
    partials' dtype. Then ``end_decision`` of a step whose decision made no collective: a guard alone, decision 1,
    collective 2, nothing summed."""

    def step(rank: int) -> torch.Tensor:
        reducer = SequenceReducer(group, "cfg")
        reducer.begin_step("cond", 5, [0, 3], torch.zeros(1), num_steps=8)
        got = reducer.sum(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1))
        reducer.begin_step("cond", 6, [0, 3], torch.zeros(1), num_steps=8)
        reducer.end_decision(True)
        return got

    sums = group.run(step)
    for rank in (0, 1):
        assert isinstance(sums[rank], torch.Tensor), sums[rank]
        assert sums[rank].dtype == torch.float32 and sums[rank].tolist() == [3.0, 6.0, 9.0]
        first, second = group.sent[rank]
        assert first.dtype == torch.float64 and first.numel() == 3 + 2 * len(GUARD_FIELDS)
        row = [_crc("cfg"), _crc("cond"), 8.0, 5.0, 2.0, 3.0, -1.0, 1.0, 3.0]
        assert _rows(first) == ([row, [0.0] * 9] if rank == 0 else [[0.0] * 9, row])
        assert first[:3].tolist() == [1.0 * (rank + 1), 2.0 * (rank + 1), 3.0 * (rank + 1)]
        assert second.numel() == 2 * len(GUARD_FIELDS)
        assert _rows(second)[rank] == [_crc("cfg"), _crc("cond"), 8.0, 6.0, 2.0, 3.0, 1.0, 2.0, 0.0]


def test_unknown_steps_and_no_full_step_yet_are_minus_one(group: _ThreadGroup) -> None:
    """No announced step count and no full step yet: -1 in both fields (0 would read as "0 steps", "step 0")."""

    def step(rank: int) -> None:
        reducer = SequenceReducer(group, "cfg")
        reducer.begin_step("cond", 0, [], torch.zeros(1))
        reducer.end_decision(False)

    assert group.run(step) == [None, None]
    assert _rows(group.sent[0][0])[0] == [_crc("cfg"), _crc("cond"), -1.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0]


def test_deferred_sums_are_handed_back_in_order_with_their_shapes_and_dtypes(group: _ThreadGroup) -> None:
    """Two deferred partial sums (RFE's ratios: float16 (2, 2) and float32 (3,)) ride with the step's collective,
    each summed over the ranks and handed to its own callback in its own shape and dtype; a generation's ``reset``
    drops those still deferred (their states are gone) and restarts the collectives' count."""

    def step(rank: int) -> dict[str, Any]:
        reducer = SequenceReducer(group, "cfg")
        got: dict[str, Any] = {}
        reducer.later(torch.tensor([9.0]), lambda s: got.setdefault("stale", s))
        reducer.reset()
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16) * (rank + 1)
        b = torch.tensor([10.0, 20.0, 30.0]) * (rank + 1)
        reducer.later(a, lambda s: got.setdefault("a", s))
        reducer.later(b, lambda s: got.setdefault("b", s))
        reducer.begin_step("cond", 0, [], torch.zeros(1), num_steps=4)
        got["own"] = reducer.sum(torch.tensor([1.0], dtype=torch.float64))
        return got

    for rank, got in enumerate(group.run(step)):
        assert isinstance(got, dict), got
        assert "stale" not in got
        assert got["a"].dtype == torch.float16 and got["a"].tolist() == [[3.0, 6.0], [9.0, 12.0]]
        assert got["b"].dtype == torch.float32 and got["b"].tolist() == [30.0, 60.0, 90.0]
        assert got["own"].tolist() == [2.0]
        sent = group.sent[rank][0]
        assert sent.numel() == 1 + 4 + 3 + 2 * len(GUARD_FIELDS)  # nothing of the dropped [9.0]
        assert _rows(sent)[rank][7:] == [1.0, 8.0]  # the generation's first collective, 8 numbers summed


def test_a_disagreement_names_the_fields_and_this_processs_context(group: _ThreadGroup) -> None:
    """Ranks at different contexts raise on both, naming the differing fields and this process's own context; ranks
    at different steps name the step, with no "This process had" sentence (neither checksum differs)."""

    def contexts(rank: int) -> None:
        reducer = SequenceReducer(group, "cfg")
        reducer.begin_step("cond" if rank == 0 else "uncond", 2, [0], torch.zeros(1), num_steps=4)
        reducer.sum(torch.ones(1))

    for rank, err in enumerate(group.run(contexts)):
        assert isinstance(err, ContextParallelMismatch), err
        assert "They differ in context." in str(err)
        assert f"This process (rank {rank}) had call context {['cond', 'uncond'][rank]!r}." in str(err)

    def steps(rank: int) -> None:
        reducer = SequenceReducer(group, "cfg")
        reducer.begin_step("cond", 2 + rank, [0], torch.zeros(1), num_steps=4)
        reducer.end_decision(True)

    for err in group.run(steps):
        assert isinstance(err, ContextParallelMismatch), err
        assert "They differ in step." in str(err) and "This process" not in str(err)
        assert "rank 0: config" in str(err) and "step 2" in str(err) and "step 3" in str(err)


def test_agree_compares_the_step_count_and_a_callables_address_is_not_compared(group: _ThreadGroup) -> None:
    """``agree``: one guard of fixed size; rank 0 announcing 8 steps and rank 1 announcing 3 both raise. A
    configuration whose repr holds a callable's address (different in each process) agrees: the address is cut."""

    def agree(rank: int) -> str:
        reducer = SequenceReducer(group, f"Cfg(fn=<function f at 0x7f{rank}a3c0>)")
        reducer.agree("cond", 8, torch.zeros(1))
        return reducer._config_repr

    assert group.run(agree) == ["Cfg(fn=<function f>)"] * 2
    assert _rows(group.sent[0][0])[0] == [_crc("Cfg(fn=<function f>)"), _crc("cond"), 8.0, -1.0, 0.0, -1.0, -1.0,
                                          1.0, 0.0]

    def refuse(rank: int) -> None:
        SequenceReducer(group, "cfg").agree("cond", 8 if rank == 0 else 3, torch.zeros(1))

    for err in group.run(refuse):
        assert isinstance(err, ContextParallelMismatch) and "They differ in steps." in str(err), err


def test_a_given_sequence_group_is_used_on_a_model_without_context_parallelism(
        group: _ThreadGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """``enable(..., sequence_group=...)`` on a model diffusers does not split (xDiT's): the reducer sums over that
    group, and relcache's step hook is not behind a split hook (``after_split`` False); without a group, none."""
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    model = nn.Linear(2, 2)
    assert distributed.reducer_for(model, None, "cfg") is None
    reducer = group.run(lambda rank: distributed.reducer_for(model, group, "cfg"))[0]
    assert isinstance(reducer, SequenceReducer) and reducer.group is group and not reducer.after_split
    distributed.check_enable_order(model, reducer)  # no diffusers split on it: accepted
    distributed.check_enable_order(model, None)


def test_split_storage_refuses_scales_over_tokens_only_where_a_role_is_scaled() -> None:
    """Scales per sample or channel span tokens: refused under context parallelism for any scaled role (fp16 base,
    int8 input); a float format with float32's range (bfloat16: no scale) or per-token scales are accepted."""
    reducer = object()  # any reducer: a split sequence
    for storage in (relcache.CacheStorage(torch.float16, scale="channel"),
                    relcache.CacheStorage(None, None, "int8", scale="sample")):
        with pytest.raises(relcache.ConfigError, match="use scale='token' with context parallelism"):
            distributed.check_split_storage(reducer, storage)  # type: ignore[arg-type]
        distributed.check_split_storage(None, storage)
    for storage in (relcache.CacheStorage(torch.bfloat16, torch.bfloat16, scale="sample"),
                    relcache.CacheStorage("int8", "int4", "int8", scale="token")):
        distributed.check_split_storage(reducer, storage)  # type: ignore[arg-type]


def test_the_enable_order_is_checked_against_diffusers_split(group: _ThreadGroup,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A model carrying diffusers' context-parallel mesh: a reducer made from it (relcache enabled after
    ``enable_parallelism``) passes; a reducer over a group given to ``enable`` before the split existed, or no reducer
    at all, is refused with the order to follow."""
    from types import SimpleNamespace

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    group.local.rank = 0
    model = nn.Linear(2, 2)
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(
        _flattened_mesh=SimpleNamespace(get_group=lambda: group)))
    after = distributed.reducer_for(model, None, "cfg")
    assert after is not None and after.group is group and after.after_split
    distributed.check_enable_order(model, after)
    for before in (SequenceReducer(group, "cfg", after_split=False), None):
        with pytest.raises(relcache.ConfigError, match=r"first, then relcache.enable"):
            distributed.check_enable_order(model, before)
