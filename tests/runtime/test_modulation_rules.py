"""More rules of ``batch_modulation`` (``relcache.runtime.modulation``), each against a hand-counted number of served
projections or the plain model's outputs (the loop and the model of test_modulation.py): a batch of per-sample
timesteps compared as tensors, a loop running past its announced steps, a later generation refilling the previous
table in place, the tables kept between generations counted in ``buffer_bytes``, and autocast"""

from __future__ import annotations

import torch
from conftest import tiny_dit
from test_modulation import LABELS, LAYERS, PROJECTIONS, STEPS, TS, _loop, _served

import relcache
from relcache import FORA
from relcache.api import _session


def test_float_timesteps_that_differ_per_sample_are_not_served():
    """A float timestep batch is compared as tensors with the int64 table (not on host numbers): [879., 872.] at step
    1, whose announced timestep is 879, differs in sample 1, so nothing is served (any sample differing is enough);
    [879., 879.] is served (4 projections)."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS, steps=1)  # step 0 builds the table (its call measures FLOPs: nothing counted)
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            model(x, timestep=torch.tensor([float(TS[1]), float(TS[1]) - 7.0]), class_labels=LABELS)
            assert _served(model) == 0
            model(x, timestep=torch.tensor([float(TS[2]), float(TS[2])]), class_labels=LABELS)
            assert _served(model) == PROJECTIONS
    finally:
        relcache.disable(model)


def test_a_loop_running_past_its_announced_timesteps_computes_its_projections():
    """Two timesteps announced, three calls: the third has no row in the table (a step past its end), so it computes
    its projections and equals the plain model's call."""
    ts = [999, 879, 759]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for batch_modulation in (False, True):
        model = tiny_dit(layers=LAYERS)
        relcache.enable(model, FORA(1, 1), batch_modulation=batch_modulation)
        try:
            relcache.begin_generation(model, timesteps=ts[:2])
            with torch.no_grad():
                got = [model(x, timestep=torch.full((2,), t), class_labels=LABELS).sample for t in ts]
            outs.append(got)
            if batch_modulation:
                assert _served(model) == PROJECTIONS  # step 1 only (step 0 measures FLOPs, step 2 has no row)
        finally:
            relcache.disable(model)
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_later_generation_refills_the_table_with_its_own_timesteps_and_labels():
    """A second generation of other timesteps and labels, the same shapes: the table is refilled in place (the same
    tensors) with the new rows, timesteps and labels, so every one of its steps is served (no call measures FLOPs
    any more: 8 x 4 projections) and its outputs equal the plain model's for that generation."""
    other_ts = [950 - 110 * i for i in range(STEPS)]
    other_labels = torch.tensor([7, 1000])
    plain_model = tiny_dit(layers=LAYERS)
    with relcache.cached(plain_model, FORA(1, 1)):
        plain = _loop(plain_model, other_ts, other_labels)
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS)
        first = _session(model).modulation.tables["default"]
        before = _served(model)
        outs = _loop(model, other_ts, other_labels)
        table = _session(model).modulation.tables["default"]
        assert table is first  # refilled in place
        assert table.timesteps.tolist() == other_ts
        assert _served(model) - before == STEPS * PROJECTIONS
    finally:
        relcache.disable(model)
    for a, b in zip(plain, outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_generation_of_float_timesteps_builds_a_table_of_its_own_dtype():
    """A generation announcing int64 timesteps, then one passing float timesteps 0.5 off them (999.5, 879.5, ...):
    the int64 table may not be refilled with them (they would read 999, 879, ... and no call would match), so a
    float table is built and every step of the second generation is served."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS)
        halves = [t + 0.5 for t in TS]
        x = torch.randn(2, 4, 8, 8)
        relcache.begin_generation(model, timesteps=halves)
        before = _served(model)
        with torch.no_grad():
            for t in halves:
                model(x, timestep=torch.full((2,), t), class_labels=LABELS)
        table = _session(model).modulation.tables["default"]
        assert table.timesteps.dtype == torch.float32 and table.timesteps.tolist() == halves
        assert _served(model) - before == STEPS * PROJECTIONS
    finally:
        relcache.disable(model)


def test_tables_kept_between_generations_count_in_buffer_bytes():
    """After a generation the table is kept to be refilled in place: ``stats().buffer_bytes`` still counts it
    (47168 bytes, tests/runtime/test_modulation.py's hand count) once the next generation has begun and before its
    first call; ``disable`` frees it."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        _loop(model, TS, LABELS)
        relcache.begin_generation(model, timesteps=TS)
        assert _session(model).modulation.tables == {}
        assert relcache.stats(model).buffer_bytes == 47168
        tables = _session(model).modulation
    finally:
        relcache.disable(model)
    # the removed hooks still refer to the tables' owner until the cycle collector runs: it holds nothing
    assert tables.spare == {} and tables.tables == {} and tables.nbytes == 0


def test_rows_computed_under_autocast_serve_only_calls_under_the_same_autocast():
    """A first call under ``torch.autocast`` (bfloat16) builds bfloat16 projection rows and embeddings computed with
    bfloat16 products (float32 tensors). The next call outside autocast is served neither: its output equals the
    plain model's exactly (found by review: the embeddings were served, 8e-4 off). A generation wholly under the same
    autocast reads its embeddings and projections from the table at every step, and its outputs are the same
    generation's without the option up to bfloat16 rounding."""
    ts = TS[:3]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = tiny_dit(layers=LAYERS)
    with torch.no_grad():
        ref = plain(x, timestep=torch.full((2,), ts[1]), class_labels=LABELS).sample
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        relcache.begin_generation(model, timesteps=ts)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x, timestep=torch.full((2,), ts[0]), class_labels=LABELS)
            out = model(x, timestep=torch.full((2,), ts[1]), class_labels=LABELS).sample
        tables = _session(model).modulation
        assert tables.tables["default"].rows[0].dtype == torch.bfloat16
        assert (tables.served, tables.sources_served) == (0, 0)
        assert out.dtype == torch.float32 and torch.equal(out, ref)
        relcache.begin_generation(model, timesteps=ts)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [model(x, timestep=torch.full((2,), t), class_labels=LABELS).sample for t in ts]
            refs = [plain(x, timestep=torch.full((2,), t), class_labels=LABELS).sample for t in ts]
        # every step's embeddings (one source here) and projections from the table, bfloat16 as the call's own
        assert (tables.served, tables.sources_served) == (len(ts) * PROJECTIONS, len(ts))
        for out, ref in zip(outs, refs, strict=True):
            assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref.float(), rtol=0, atol=2e-2)
    finally:
        relcache.disable(model)


def test_a_generation_with_autograd_on_builds_no_table():
    """With autograd on no projection may be served (their gradients would not reach the weights), so no table is
    built either: nothing tabulated, nothing held in ``buffer_bytes``."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        relcache.begin_generation(model, timesteps=TS[:2])
        x = torch.randn(2, 4, 8, 8)
        for t in TS[:2]:
            model(x, timestep=torch.full((2,), t), class_labels=LABELS)
        assert _session(model).modulation.tables == {} and _served(model) == 0
        assert relcache.stats(model).buffer_bytes == 0
    finally:
        relcache.disable(model)


def test_an_embedding_left_in_training_mode_builds_no_table():
    """The projections in eval mode but the embeddings that feed them (the table's sources, with DiT's label dropout)
    in training mode: building the table would draw the dropout for every row, so none is built, and the outputs
    equal the run without the option under the same seed."""
    outs = []
    for batch_modulation in (False, True):
        model = tiny_dit(layers=LAYERS)
        for block in model.transformer_blocks:
            block.norm1.emb.train()
        relcache.enable(model, FORA(1, 1), batch_modulation=batch_modulation)
        try:
            torch.manual_seed(123)
            outs.append(_loop(model, TS, LABELS))
            if batch_modulation:
                assert _session(model).modulation.tables == {} and _served(model) == 0
        finally:
            relcache.disable(model)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


class _Host:
    def __init__(self, measuring: bool = False) -> None:
        self._measuring = measuring

    def modulating(self) -> bool:
        return True

    def measuring(self) -> bool:
        return self._measuring


class _Rows:
    """A stand-in for ``Modulations``: the running step's row is all 7s."""

    def __init__(self) -> None:
        self.asked = []

    def row(self, index, x, saved=True):
        self.asked.append((index, saved))
        return torch.full((*x.shape[:-1], 3), 7.0)


def test_a_projection_hook_serves_only_a_call_of_one_positional_input():
    """``ModulationHook`` on a linear projection: ``proj(x)`` reads the row; ``proj(input=x)`` (a keyword) is
    computed, and so is a call with autograd on; a call whose FLOPs are measured computes the product too (counted)
    but returns the row, not counted as saved."""
    from relcache.runtime.attachment import Attachment
    from relcache.runtime.modulation import ModulationHook

    proj = torch.nn.Linear(2, 3).eval()
    owner = torch.nn.Module()
    owner.proj = proj
    rows = _Rows()
    Attachment(owner).register(proj, ModulationHook(rows, 2, _Host()), "m")
    x = torch.ones(4, 2)
    with torch.no_grad():
        assert torch.equal(proj(x), torch.full((4, 3), 7.0))
        assert torch.equal(proj(input=x), torch.nn.functional.linear(x, proj.weight, proj.bias))
    assert torch.allclose(proj(x), torch.nn.functional.linear(x, proj.weight, proj.bias))  # autograd on
    assert rows.asked == [(2, True)]
    counted = []

    class Counted(torch.nn.Linear):
        def forward(self, x):
            counted.append(1)
            return super().forward(x)

    proj2 = Counted(2, 3).eval()
    owner.proj2 = proj2
    Attachment(owner).register(proj2, ModulationHook(rows, 0, _Host(measuring=True)), "m")
    with torch.no_grad():
        assert torch.equal(proj2(x), torch.full((4, 3), 7.0))
    assert rows.asked[-1] == (0, False) and counted == [1]


def test_the_copy_of_inference_conditioning_counts_in_buffer_bytes():
    """Labels made under ``torch.inference_mode`` have no version counter: the table keeps a copy (two int64 labels,
    16 bytes) beside its 47168 bytes of rows and timesteps, and ``buffer_bytes`` counts it."""
    model = tiny_dit(layers=LAYERS)
    relcache.enable(model, FORA(1, 1), batch_modulation=True)
    try:
        with torch.inference_mode():
            labels = LABELS.clone()
            _loop(model, TS, labels, steps=2)
        assert relcache.stats(model).buffer_bytes == 47168 + 16
    finally:
        relcache.disable(model)


def test_flops_are_counted_as_without_the_option():
    """The measured call computes every projection and embedding (to count them) while returning the table's rows:
    the FLOP counts equal those of the run without ``batch_modulation`` (FORA(2), 4 steps)."""
    counts = []
    for batch_modulation in (False, True):
        model = tiny_dit(layers=LAYERS)
        relcache.enable(model, FORA(2), batch_modulation=batch_modulation)
        try:
            _loop(model, TS[:4], LABELS)
            c = relcache.stats(model).contexts["default"]
            counts.append((c.model_executed_flops, c.model_full_flops, c.executed_flops, c.full_flops))
        finally:
            relcache.disable(model)
    assert counts[0] == counts[1] and counts[0][1] > counts[0][0] > 0
