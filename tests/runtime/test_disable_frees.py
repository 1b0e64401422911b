"""``disable`` frees the caches at once: the session and its hooks refer to each other, so before 2026-12-04 every
cache tensor outlived ``disable`` until Python's cycle collector ran, and enabling method after method on FLUX.1 at
1024x1024 ran an H200 out of memory. Checked with the collector off: every tensor the session reached (not the
model's weights) must be gone once ``disable`` returns."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import types
import weakref
from collections.abc import Iterator

import pytest
import torch
from conftest import dit_inputs, run_loop, tiny_dit

import relcache
from relcache import FORA, RFC, CFGCache, TaylorSeer
from relcache.api import _session

_SKIP = (types.FunctionType, types.ModuleType, type, types.BuiltinFunctionType, types.CodeType)


def held_tensors(root: object, model: torch.nn.Module) -> list[weakref.ref]:
    """Weak references to every tensor reachable from ``root`` through its objects' references, modules' weights
    excluded (functions, classes and modules are not followed: they reach the whole process through globals)."""
    weights = {id(t) for t in [*model.parameters(), *model.buffers()]}
    seen, found, todo = set(), [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (torch.nn.Module, *_SKIP)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in weights:
                found.append(weakref.ref(obj))
            continue
        todo.extend(gc.get_referents(obj))
    return found


def _generation(model: torch.nn.Module, cfg_batch: bool) -> None:
    """12 steps with their timesteps announced (what lets batch modulation build its tables)."""
    x, labels = dit_inputs()
    if cfg_batch:  # a CFG batch: conditional half, then the null class
        x, labels = torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, 1000)])
    timesteps = [999 - i * (999 // 12) for i in range(12)]
    relcache.begin_generation(model, 12, timesteps=torch.tensor(timesteps))
    run_loop(model, x, labels, steps=12, begin=False, timesteps=timesteps)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Python's cycle collector off for the block (as it was after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def assert_disable_frees(model: torch.nn.Module, at_least: int = 1) -> None:
    """``disable(model)`` leaves none of the tensors its session reached alive (``at_least`` of them were found)."""
    held = held_tensors(_session(model), model)
    assert len(held) >= at_least
    relcache.disable(model)
    alive = [ref() for ref in held if ref() is not None]
    assert not alive, f"{len(alive)} of {len(held)} tensors outlived disable: {[tuple(t.shape) for t in alive]}"


@pytest.mark.parametrize("config, cfg_batch, modulation", [
    (FORA(3), False, False),
    (TaylorSeer(3, 2), False, False),
    (RFC(order=2, target_nfc=5), False, False),
    (RFC(order=2, target_nfc=5), False, True),
    (dataclasses.replace(FORA(3), cfg_cache=CFGCache(skip_full=True)), True, False),
], ids=["FORA", "TaylorSeer", "RFC", "RFC+batch-modulation", "FORA+CFG-Cache"])
def test_disable_frees_every_cache_tensor_without_the_cycle_collector(config, cfg_batch, modulation):
    model = tiny_dit()
    relcache.enable(model, config, batch_modulation=modulation)
    with collector_off():
        _generation(model, cfg_batch)
        assert relcache.stats(model).cache_bytes > 0
        if modulation:  # its tables were built and read (the case checks them)
            assert _session(model).modulation.served > 0
        assert_disable_frees(model, at_least=3 * 2)  # the caches of 3 blocks' attention and feed-forward at least


def test_disable_frees_a_compiled_models_caches_too():
    """Under torch.compile the caches live in static buffers, which dynamo's tracing leftovers (reference cycles) also
    held after ``disable`` until the cycle collector ran (found by review, 2026-12-04): ``disable`` runs it once where
    static buffers existed. Two compiled generations, the second replaying the graphs, with the collector off."""
    torch._dynamo.reset()
    model = tiny_dit()
    relcache.enable(model, FORA(3))
    compiled = torch.compile(model, backend="aot_eager")
    try:
        with collector_off():
            x, labels = dit_inputs()
            for _ in range(2):
                run_loop(compiled, x, labels, steps=12)
            assert _session(model).static.buffers  # the caches were held in static buffers
            assert_disable_frees(model)
    finally:
        torch._dynamo.reset()


def test_a_generations_end_leaves_no_module_slot_holding_its_caches():
    """The hooks reach each module's caches through its slot (``modules.ModuleSlot``), bound to the running context's
    records: at a generation's end its caches are freed (``free_caches``) through the records the slots still point
    at, and a new generation's reset unbinds them."""
    from conftest import dit_pipe

    pipe = dit_pipe()
    relcache.enable(pipe, FORA(2))
    try:
        pipe(class_labels=[1], num_inference_steps=4, generator=torch.manual_seed(0), output_type="np")
        session = _session(pipe)
        assert session.slots and all(slot.record is None or not slot.record.states for slot in session.slots)
        session.reset_generation()
        assert all(slot.record is None for slot in session.slots)
    finally:
        relcache.disable(pipe)
