"""Cosmos 3 Omni (``models/cosmos3.py``): one packed sequence without a batch axis, and a joint attention whose
first stream (the text) is the same at every step. The contract suite covers the rest (families.py's tiny model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from families import CASES, generate, generate_with_stats  # noqa: E402

import relcache  # noqa: E402
from relcache import RFC  # noqa: E402
from relcache.api import _session  # noqa: E402
from relcache.models import find_adapter  # noqa: E402
from relcache.models.base import Blocks  # noqa: E402
from relcache.models.cosmos3 import MOT_LAYER, Cosmos3Adapter  # noqa: E402

CASE = CASES["cosmos3"]


@pytest.fixture(scope="module")
def pipe():
    return CASE.build()


def test_modules_are_unbatched_and_probe_the_generation_stream(pipe):
    """The adapter marks every module unbatched and reads the attention's second input (the generation stream); the
    runtime's view of a ``(tokens, dim)`` tensor has a leading axis of one, and a forecast goes back to ``(tokens,
    dim)`` as the same storage."""
    specs = find_adapter(pipe.transformer).cached_modules(pipe.transformer)
    assert {s.batched for s in specs} == {False}
    assert [s.probe for s in specs[:3]] == [1, 0, 0]
    und, gen = torch.randn(5, 16), torch.randn(16, 16)
    ins = specs[0].inputs((und, gen, None), {})
    assert [x.shape for x in ins] == [(1, 5, 16), (1, 16, 16)] and ins[1].data_ptr() == gen.data_ptr()
    outs = specs[0].outputs((und, gen))
    back = specs[0].returned(outs, tuple)
    assert back[0].shape == und.shape and back[0].data_ptr() == und.data_ptr() and back[1].data_ptr() == gen.data_ptr()
    assert specs[1].returned(specs[1].outputs(und), None).shape == (5, 16)


def test_rcs_sees_the_generation_stream_move_and_not_the_text(pipe):
    """RCS's input error at every cached step: positive with the adapter's probe (the generation stream), exactly
    zero if it read the text stream instead, which is why the row names the second input."""
    errors = {}
    text_probe = tuple(dataclasses.replace(s, probe=0) for s in MOT_LAYER)
    for probe, adapter in (("gen", find_adapter(pipe.transformer)),
                           ("text", Cosmos3Adapter(dataclasses.replace(Cosmos3Adapter.default_row,
                                                                       groups=(Blocks("layers", text_probe),))))):
        with relcache.cached(pipe, RFC(target_nfc=4), adapter=adapter):
            _, st = generate_with_stats(pipe, CASE)
        errors[probe] = [e for ctx in st.contexts.values() for e in ctx.input_errors.values()]
    assert len(errors["gen"]) > 0 and min(errors["gen"]) > 1e-3
    assert errors["text"] and max(errors["text"]) == 0.0


def test_rfe_ratio_is_one_number_per_sequence(pipe):
    """Per-sample quantities span the whole packed sequence (one sample), not one per token: RFE's ratio ``s`` of
    every module (each stream of the attention) is a single number once two full steps are recorded."""
    model = pipe.transformer
    shapes: dict[tuple[int, str, int], tuple[int, ...]] = {}

    def look(*_: object) -> None:
        for ctx in _session(model).contexts.values():
            for idx, record in ctx.caches.records.items():
                for group, states in record.states.items():
                    for j, st in enumerate(states):
                        if st.ratio is not None:
                            shapes[(idx, group, j)] = tuple(st.ratio.shape)

    with relcache.cached(pipe, RFC(target_nfc=4)):
        handle = model.layers[-1].mlp_moe_gen.register_forward_pre_hook(look)
        try:
            generate(pipe, CASE)
        finally:
            handle.remove()
    n_outputs = 2 + 1 + 1  # the attention's two streams, then each MLP
    assert len(shapes) == n_outputs * len(model.layers) and set(shapes.values()) == {(1,)}


def test_cfg_cache_rebuilds_the_uncond_call_from_a_list_output(pipe):
    """The transformer returns its vision prediction as a list of one tensor: CFG-Cache reads and rebuilds that
    tensor, skips "uncond" calls, and the output stays close to full computation."""
    ref = generate(pipe, CASE)
    config = dataclasses.replace(RFC(target_nfc=4), cfg_cache=relcache.CFGCache(skip_full=True))
    with relcache.cached(pipe, config):
        out, st = generate_with_stats(pipe, CASE)
    assert st.uncond_skipped > 0 and np.isfinite(out).all()
    assert np.abs(out - ref).mean() / np.abs(ref).mean() < 0.02  # measured 0.0067 (RFC alone: 0.0067)


def test_compiled_every_frame_compiles_and_matches_eager():
    """The "cond" and "uncond" calls (5 and 3 text tokens) need more graph variants than dynamo's recompile limit (8)
    allows one code object; each kind of call has an entry frame of its own (``hooks.StepHook``), so at the default
    limit no frame is given up over two generations (when one frame took every call, with two layers: 53 frames, 52
    compiled), and the output equals the eager run's within float32 rounding. One layer (suite time): the same 18
    graph variants as two layers', traced in two thirds of the time; the test checks there are more than 8."""
    pipe = CASE.build(layers=1)
    with relcache.cached(pipe, RFC(target_nfc=4)):
        eager = generate(pipe, CASE)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = pipe.transformer
    try:
        with relcache.cached(pipe, RFC(target_nfc=4)):
            pipe.transformer = torch.compile(model, backend="eager")  # dynamo alone: what the limit is about
            outs = [generate(pipe, CASE) for _ in range(2)]
    finally:
        pipe.transformer = model
        torch._dynamo.reset()
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
    assert counters["stats"]["unique_graphs"] > 8  # more than one frame's limit: the case the entry frames are for
    for out in outs:
        np.testing.assert_allclose(out, eager, rtol=0, atol=1e-5)
