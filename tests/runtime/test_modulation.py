"""``enable(..., batch_modulation=True)``: every step's adaLN projections computed at a generation's first call.

Checked on a tiny DiT: outputs equal the per-step products up to rounding, the table serves exactly the calls it may
(not the FLOP-measured one, not a step whose timestep or labels differ from the announced ones, not a half-batch
call), a generation of other timesteps rebuilds it, compiled steps read it without a break or a recompilation, and
bad arguments are refused up front.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import dit_pipe, tiny_dit
from families import pixart_pipe
from torch._dynamo.utils import counters

import relcache
from relcache import FORA, RFC, CFGCache, ConfigError, TaylorSeer
from relcache.api import _session
from relcache.runtime.modulation import ModulationMismatch

STEPS = 8
LAYERS = 3
PROJECTIONS = LAYERS + 1  # every block's norm1.linear and the final layer's proj_out_1


def _loop(model, timesteps, labels, announced=None, x=None, steps=None):
    """A DDIM-like loop over ``timesteps``, announcing ``announced`` (default: the same) to relcache."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) if x is None else x
    relcache.begin_generation(model, timesteps=timesteps if announced is None else announced)
    outs = []
    with torch.no_grad():
        for i, t in enumerate(timesteps[:steps]):
            out = model(x, timestep=torch.full((2,), int(t)), class_labels=labels).sample
            outs.append(out)
            x = x - 0.05 * out + 0.01 * i
    return outs


def _served(model) -> int:
    return _session(model).modulation.served


TS = [999 - 120 * i for i in range(STEPS)]
LABELS = torch.tensor([3, 1000])


@pytest.mark.parametrize("config", [FORA(1, 1), RFC(threshold=0.3), TaylorSeer(3)], ids=["full", "RFC", "TaylorSeer"])
def test_outputs_equal_the_per_step_products_up_to_rounding(config):
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, config)
    plain = _loop(model, TS, LABELS)
    plain_full = relcache.stats(model).full_steps
    relcache.disable(model)
    relcache.enable(model, config, batch_modulation=True)
    try:
        first = _loop(model, TS, LABELS)
        # the first call measures FLOPs computing everything (but returns the table's rows); every later projection
        # reads the table, and so do the embeddings that feed them: tiny_dit's copies are tied, so shared, read once
        # per call
        assert _served(model) == (STEPS - 1) * PROJECTIONS
        assert _session(model).modulation.sources_served == STEPS - 1
        second = _loop(model, TS, LABELS)
        assert _served(model) == (2 * STEPS - 1) * PROJECTIONS
        assert relcache.stats(model).full_steps == plain_full
        third = _loop(model, TS, LABELS)
    finally:
        relcache.disable(model)
    for a, b, c, d in zip(plain, first, second, third, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d, c, rtol=0, atol=0)  # the same table, refilled in place: bit-identical
        # the first generation too, though its first call measured FLOPs (it differed by rounding: found by review)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_untied_embeddings_are_each_read_from_the_table():
    """Each block's own embedding (random weights: not shared) is read from the table at every served call; block 0's
    serves the final layer again, as the same call's shared output. Outputs equal the per-step computation's."""
    model = tiny_dit(layers=LAYERS)
    with torch.no_grad():  # every copy differs
        for block in model.transformer_blocks:
            block.norm1.emb.timestep_embedder.linear_1.weight.normal_()
    runs: list[int] = []
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.register_forward_hook(lambda *_: runs.append(1))
    with relcache.cached(model, TaylorSeer(3)):
        plain = _loop(model, TS, LABELS)
    runs.clear()
    relcache.enable(model, TaylorSeer(3), batch_modulation=True)
    try:
        served = _loop(model, TS, LABELS)
        assert _session(model).modulation.sources_served == (STEPS - 1) * LAYERS
    finally:
        relcache.disable(model)
    # the table (every source once) and the first call (FLOPs measured: every copy, block 0's twice), nothing after
    assert len(runs) == LAYERS + LAYERS + 1
    for a, b in zip(plain, served, strict=True):  # rounding: normal_() weights are larger than the defaults
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_the_table_holds_each_steps_projection():
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS)
        table = _session(model).modulation.tables["default"]
        block = model.transformer_blocks[1]
        with torch.no_grad():
            for i, t in enumerate(TS):
                emb = block.norm1.emb(torch.full((2,), t), LABELS, hidden_dtype=torch.float32)
                torch.testing.assert_close(table.rows[1][i], block.norm1.linear(torch.nn.functional.silu(emb)),
                                           rtol=1e-5, atol=1e-6)
                # after the projections' rows, each block's embedding (its source), in block order
                torch.testing.assert_close(table.rows[PROJECTIONS + 1][i], emb, rtol=1e-5, atol=1e-6)
        assert len(table.rows) == PROJECTIONS + LAYERS
    finally:
        relcache.disable(model)


def test_a_model_cast_after_enable_builds_its_table_in_the_new_dtype():
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS, steps=2)
        model.to(torch.bfloat16)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
        outs = _loop(model, TS, LABELS, x=x)  # was: "mat1 and mat2 must have the same dtype" in the table's build
        assert _session(model).modulation.tables["default"].rows[0].dtype == torch.bfloat16
    finally:
        relcache.disable(model)
    plain = _loop(model, TS, LABELS, x=x)
    for a, b in zip(plain, outs, strict=True):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_a_model_cast_in_the_middle_of_a_generation_computes_its_projections_from_then_on():
    """The table's rows are in the dtype the model had at the generation's first call. After a cast mid-generation
    nothing is served (was: block 0's embedding rows, float32, reached the bfloat16 attention, which refused them)."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loop(model, enabled):
        if enabled:
            relcache.begin_generation(model, timesteps=TS)
        xi, outs = x, []
        with torch.no_grad():
            for i, t in enumerate(TS):
                if i == 3:
                    model.to(torch.bfloat16)
                    xi = xi.bfloat16()
                out = model(xi, timestep=torch.full((2,), int(t)), class_labels=LABELS).sample
                outs.append(out)
                xi = xi - 0.05 * out + 0.01 * i
        return outs

    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        outs = loop(model, True)
        assert _served(model) == 2 * PROJECTIONS  # steps 1 and 2 (step 0's FLOPs are measured: it computes)
    finally:
        relcache.disable(model)
    plain = loop(tiny_dit(layers=LAYERS), False)
    for a, b in zip(plain, outs, strict=True):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_steps_that_differ_from_the_announced_ones_compute_their_projections():
    """On the CPU each step's timestep is compared with the announced one: a step off the announcement, labels
    changed mid-generation, or a generation without announced timesteps compute as usual."""
    model = tiny_dit(layers=LAYERS)
    announced = list(TS)
    announced[3] += 1  # the loop's step 3 is not the announced step 3
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS, announced=announced)
        assert _served(model) == (STEPS - 2) * PROJECTIONS  # not step 0 (FLOPs measured), not step 3
        # other labels than the table's: nothing served
        before = _served(model)
        relcache.begin_generation(model, timesteps=TS)
        with torch.no_grad():
            x = torch.randn(2, 4, 8, 8)
            model(x, timestep=torch.full((2,), TS[0]), class_labels=LABELS)
            model(x, timestep=torch.full((2,), TS[1]), class_labels=torch.tensor([4, 1000]))
        assert _served(model) == before + PROJECTIONS  # step 0 only
        # the table's own labels changed in place: stale, nothing served
        labels = LABELS.clone()
        relcache.begin_generation(model, timesteps=TS)
        with torch.no_grad():
            model(x, timestep=torch.full((2,), TS[0]), class_labels=labels)
            labels[0] = 4
            model(x, timestep=torch.full((2,), TS[1]), class_labels=labels)
        assert _served(model) == before + 2 * PROJECTIONS  # step 0 only again
        # without announced timesteps nothing is tabulated
        relcache.begin_generation(model, STEPS)
        with torch.no_grad():
            model(x, timestep=torch.full((2,), TS[0]), class_labels=LABELS)
            model(x, timestep=torch.full((2,), TS[1]), class_labels=LABELS)
        assert _served(model) == before + 2 * PROJECTIONS
    finally:
        relcache.disable(model)


def test_a_timestep_of_another_dtype_is_compared_in_the_tables():
    """On the CPU the table compares a call's timestep on host numbers when it has the table's dtype (the first
    call's), and as tensors otherwise: a float timestep of the announced value is served, another is not (before,
    the float was cast to the table's int64 first, and 639.5 was served as 639)."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS, steps=2)  # int64 timesteps: the table's dtype
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            before = _served(model)
            model(x, timestep=torch.full((2,), float(TS[2])), class_labels=LABELS)
            assert _served(model) == before + PROJECTIONS
            model(x, timestep=torch.full((2,), float(TS[3])), class_labels=LABELS)
            assert _served(model) == before + 2 * PROJECTIONS
            model(x, timestep=torch.full((2,), TS[4] + 0.5), class_labels=LABELS)  # not the announced TS[4]
            model(x, timestep=torch.full((2,), float(TS[6])), class_labels=LABELS)  # step 5's announced is TS[5]
            assert _served(model) == before + 2 * PROJECTIONS
    finally:
        relcache.disable(model)


def test_on_an_accelerator_a_mismatch_is_found_at_the_generations_end():
    """Off the CPU the comparison stays on the device (no host sync per step) and is read once, at the end."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS, steps=2)
        table = _session(model).modulation.tables["default"]
        table.lazy, table.mismatch = True, torch.zeros((), dtype=torch.bool)  # as on a GPU
        assert table.matches(2, torch.full((2,), TS[2] + 1), (LABELS,), torch.float32)  # served, checked later
        with pytest.raises(ModulationMismatch, match="announced"):
            relcache.begin_generation(model, timesteps=TS)
    finally:
        relcache.disable(model)


def test_on_an_accelerator_a_loop_ended_by_disable_is_checked_too():
    """``disable`` ends a hand-written loop's generation: a mismatch found lazily (on an accelerator) raises there, and
    the model is disabled all the same (found by review: such a loop, ended by ``disable`` or by leaving
    ``cached()``, was never checked, and its wrong images came without an error)."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    _loop(model, TS, LABELS, steps=2)
    table = _session(model).modulation.tables["default"]
    table.lazy, table.mismatch = True, torch.zeros((), dtype=torch.bool)  # as on a GPU
    assert table.matches(2, torch.full((2,), TS[2] + 1), (LABELS,), torch.float32)  # served, checked later
    with pytest.raises(ModulationMismatch, match="announced"):
        relcache.disable(model)
    assert not relcache.is_enabled(model)


@pytest.mark.parametrize("lazy", [False, True], ids=["cpu", "accelerator"])
def test_inference_conditioning_changed_in_place_is_not_served(lazy):
    """An inference tensor has no version counter: labels created under ``torch.inference_mode`` and changed in place
    mid-generation kept the old labels' rows (found by review). They are compared by value now: on the CPU the call
    computes its projections, on an accelerator the generation's end raises."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        with torch.inference_mode():
            labels = LABELS.clone()
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            relcache.begin_generation(model, timesteps=TS)
            model(x, timestep=torch.full((2,), TS[0]), class_labels=labels)
            table = _session(model).modulation.tables["default"]
            if lazy:
                table.lazy, table.mismatch = True, torch.zeros((), dtype=torch.bool)  # as on a GPU
            assert table.matches(1, torch.full((2,), TS[1]), (labels,), torch.float32)
            labels[0] = 5
            assert table.matches(2, torch.full((2,), TS[2]), (labels,), torch.float32) is lazy
            if lazy:
                with pytest.raises(ModulationMismatch, match="changed in place"):
                    table.check()
                table.mismatch.zero_()  # said: the disable below ends the generation without raising again
    finally:
        relcache.disable(model)


def test_a_pipeline_announces_its_schedulers_timesteps():
    pipe = dit_pipe()
    pipe.scheduler.set_timesteps(STEPS)  # warm the pipeline: the same calls below
    relcache.enable(pipe, FORA(2), batch_modulation=True)
    try:
        got = pipe(class_labels=[3], num_inference_steps=STEPS, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        assert _served(pipe.transformer) == (STEPS - 1) * PROJECTIONS
    finally:
        relcache.disable(pipe)
    relcache.enable(pipe, FORA(2))
    try:
        ref = pipe(class_labels=[3], num_inference_steps=STEPS, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        relcache.disable(pipe)
    assert abs(got - ref).max() < 1e-4


def test_half_batch_calls_of_cfg_cache_compute_their_projections():
    """A half-batch call runs the conditional half only: neither the projections nor the embeddings that feed them
    are read from the full-batch table (found by review: served embeddings gave such a call the whole batch)."""
    config = dataclasses.replace(FORA(2), cfg_cache=CFGCache(interval=3, skip_full=True))
    ts = [999 - 50 * i for i in range(20)]  # several half-batch calls after the first, FLOP-measured one
    model = tiny_dit(layers=LAYERS)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with relcache.cached(model, config):
        plain = _loop(model, ts, LABELS, x=torch.cat([x, x]))
    relcache.enable(model, config, batch_modulation=True)
    try:
        outs = _loop(model, ts, LABELS, x=torch.cat([x, x]))
        skipped = relcache.stats(model).uncond_skipped
        assert skipped >= 2
        assert _served(model) == (len(ts) - 1 - skipped) * PROJECTIONS
        assert _session(model).modulation.sources_served == len(ts) - 1 - skipped  # tied copies: one a call
    finally:
        relcache.disable(model)
    for a, b in zip(plain, outs, strict=True):
        assert b.shape == a.shape == (2, 4, 8, 8)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compiled_steps_read_the_table_without_a_break_or_a_recompilation():
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(3), batch_modulation=True)
    eager = _loop(model, TS, LABELS)
    relcache.disable(model)
    compiled = torch.compile(model, backend=backend)
    relcache.enable(compiled, FORA(3), batch_modulation=True)
    try:
        first = _loop(compiled, TS, LABELS)
        after_first = len(graphs)
        second = _loop(compiled, TS, LABELS)
        # a generation of other timesteps refills the same table in place: nothing new to compile
        _loop(compiled, [t - 7 for t in TS], LABELS)
        # the compiled graphs index the table: no projection of the weights in them
        linears = [str(n.args[1]) for g in graphs for n in g.graph.nodes
                   if n.op == "call_function" and n.target is torch._C._nn.linear]
        assert linears and not any("proj_out_1" in w or "norm1_modules_linear" in w for w in linears)
        # nor the embeddings that feed them (read from the table too): none of their weights is a graph input
        inputs = [n.name for g in graphs for n in g.graph.nodes if n.op == "placeholder"]
        weights = [n for n in inputs if "_parameters_" in n]
        assert any("modules_attn1" in n for n in weights)
        assert not [n for n in weights if "norm1_modules_emb" in n]
    finally:
        relcache.disable(compiled)
        torch._dynamo.reset()
    assert len(counters["graph_break"]) == 1 and "StepHook._step" in next(iter(counters["graph_break"]))
    assert after_first == len(graphs) and 2 <= after_first <= 8
    for a, b, c in zip(eager, first, second, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused_before_any_work():
    model = tiny_dit(layers=LAYERS)
    with pytest.raises(ConfigError, match="batch_modulation must be True or False"):
        relcache.enable(model, FORA(2), batch_modulation="yes")
    pixart = pixart_pipe()
    with pytest.raises(ConfigError, match="batch_modulation=True.*DiT"):
        relcache.enable(pixart, FORA(2), batch_modulation=True)
    relcache.enable(model, FORA(2), batch_modulation=True)
    try:
        with pytest.raises(ConfigError, match="timesteps must be a non-empty 1-D"):
            relcache.begin_generation(model, timesteps=[[1, 2]])
        with pytest.raises(ConfigError, match="num_steps .* must equal len"):
            relcache.begin_generation(model, 3, timesteps=[3, 2])
        with pytest.raises(ConfigError, match="timesteps must be"):
            relcache.begin_generation(model, timesteps="abc")
    finally:
        relcache.disable(model)


def test_a_model_in_training_mode_builds_no_table_and_the_tables_are_reported():
    """A model left in training mode (built from a config, no ``.eval()``): building the table ran the label dropout
    over every row, drawing from the random generator, so the outputs differed from the run without the option
    (found by review). No table is built then. In eval mode the tables are counted in ``stats().buffer_bytes``
    (T x batch x width per projection; they were reported nowhere)."""
    outs, tables = [], []
    for bm in (False, True):
        model = tiny_dit(layers=LAYERS).train()
        relcache.enable(model, FORA(1, 1), batch_modulation=bm)
        torch.manual_seed(123)
        outs.append(_loop(model, TS, LABELS))
        tables.append(dict(_session(model).modulation.tables) if bm else {})
        relcache.disable(model)
    assert tables[1] == {} and all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS)
        table = _session(model).modulation.tables["default"]
        assert table.rows[0].shape[:2] == (STEPS, 2)
        # by hand, float32 rows of T=8 steps x batch 2: per block its adaLN-zero projection (6 x width 32) and its
        # embedding's output (width), the output layer's projection (2 x width); and the 8 timesteps as int64
        want = STEPS * 2 * 4 * (LAYERS * 6 * 32 + LAYERS * 32 + 2 * 32) + STEPS * 8
        assert relcache.stats(model).buffer_bytes == want == 47168
    finally:
        relcache.disable(model)


def test_a_second_enable_with_another_batch_modulation_is_refused():
    """A pipeline sharing an enabled transformer, enabled with another ``batch_modulation`` (or ``count_flops``), was
    accepted and ran with the first enable's (found by review)."""
    from diffusers import DiTPipeline

    pipe = dit_pipe()
    other = DiTPipeline(**pipe.components)
    relcache.enable(pipe, FORA(2))
    try:
        with pytest.raises(relcache.AlreadyEnabledError, match="batch_modulation=False"):
            relcache.enable(other, FORA(2), batch_modulation=True)
        with pytest.raises(relcache.AlreadyEnabledError, match="count_flops=True"):
            relcache.enable(other, FORA(2), count_flops=False)
        relcache.enable(other, FORA(2))  # the same settings attach it
    finally:
        relcache.disable(pipe)


def test_numpy_timesteps_with_negative_strides_are_taken():
    """``np.arange(...)[::-1]`` and ``np.flip`` (how DDIM-like schedules are written) were refused as "not a 1-D
    sequence of numbers": torch takes no negative strides (found by review). They are copied now."""
    import numpy as np

    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS, announced=np.array(TS[::-1])[::-1])
        assert _served(model) == (STEPS - 1) * PROJECTIONS
    finally:
        relcache.disable(model)


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_the_callers_timesteps_are_never_written(kind):
    """A loop announcing its own timesteps tensor (or numpy array, which ``torch.as_tensor`` shares), then another
    schedule of the same length: the table, refilled in place for the second generation, held the caller's first
    tensor itself and overwrote it with the second schedule's values, so the caller's next loop over it sampled the
    other schedule and the table served nothing (found by review). The caller's values stay; the third generation
    is served again, its outputs equal to the first's."""
    import numpy as np

    first = [999 - 120 * i for i in range(STEPS)]
    second = [950 - 110 * i for i in range(STEPS)]
    make = torch.tensor if kind == "tensor" else np.array
    a, b = make(first), make(second)
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        outs_a = _loop(model, a, LABELS)
        _loop(model, b, LABELS)
        assert list(a.tolist()) == first and list(b.tolist()) == second
        served = _served(model)
        again = _loop(model, a, LABELS)
        assert _served(model) - served == PROJECTIONS * STEPS  # (only a shape's first call measures FLOPs)
        for x, y in zip(outs_a, again, strict=True):
            assert torch.equal(x, y)
    finally:
        relcache.disable(model)
