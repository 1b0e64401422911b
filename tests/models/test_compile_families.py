"""The first families' pipelines compile with relcache as the tiny DiT does (tests/runtime/test_compile.py).

``torch.compile(pipe.transformer)`` after ``relcache.enable(pipe, RFC(...))``, on each family's tiny pipeline
(tests/families.py), with a backend that only records the graphs it is given:
* the only graph breaks are relcache's own two: the step hook's skipped frame, and the host's read of RCS's decision
  (``StepCalls.settle``); nothing an adapter does breaks a family's forward;
* the second generation compiles nothing (no guard on a step number, a family's timestep or its conditioning);
* the compiled generations give the eager run's full steps and images.
Every family was checked this way on 2026-12-05 (`benchmarks/compile_families.py`, docs/performance.md "Compiled
steps across every family"): 52 of 61 hold all of this; these are four of the eight families relcache started
with. The other nine break by themselves, without relcache (a data-dependent mask or branch, MoE routing), and
none of them recompiles after its first generation either.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import recording_backend
from families import CASES, generate
from torch._dynamo.utils import counters

import relcache

#: DiT is test_compile.py's; HunyuanVideo, the slowest to trace here (34 s), is left to the benchmark, where it
#: compiles as Wan does (split CFG: a "cond" and an "uncond" call per step). PixArt and Latte too (suite time): their
#: blocks are diffusers' ``BasicTransformerBlock``, DiT's, whose compiled steps test_compile.py checks; the benchmark
#: checks all three as it does every family
HEADLINE = ["flux", "sd3", "wan", "cogvideox"]
STEPS = 8
ONE_BLOCK = ("wan", "cogvideox")


def _where(breaks: dict[str, int]) -> set[str]:
    """The break sites, named: relcache's step hook and decision read, or the break's own text."""
    return {"step" if "StepHook._step" in b else "settle" if "StepCalls.settle" in b else b for b in breaks}


@pytest.mark.parametrize("name", HEADLINE)
def test_a_family_compiles_with_no_break_of_relcaches_but_its_own_two(name):
    case = CASES[name]
    # Wan's and CogVideoX's blocks are all alike, so they trace one (suite time: Wan's one in 24 s here, two in 31);
    # SD3's are not (dual attention in block 0, the last block's context ends), and FLUX.1 has one double block
    pipe = case.build(layers=1) if name in ONE_BLOCK else case.build()
    config = relcache.RFC(threshold=0.3)
    relcache.enable(pipe, config)
    try:
        want = generate(pipe, case, steps=STEPS)
        eager_full = relcache.stats(pipe).full_steps
        torch._dynamo.reset()
        counters.clear()
        graphs: list[torch.fx.GraphModule] = []
        pipe.transformer = torch.compile(pipe.transformer, backend=recording_backend(graphs))
        first = generate(pipe, case, steps=STEPS)
        after_first, first_full = len(graphs), relcache.stats(pipe).full_steps
        second = generate(pipe, case, steps=STEPS)
        second_full = relcache.stats(pipe).full_steps
        breaks = dict(counters["graph_break"])
    finally:
        relcache.disable(pipe)
        torch._dynamo.reset()
    assert _where(breaks) == {"step", "settle"}, breaks
    assert after_first > 0 and len(graphs) == after_first, (after_first, len(graphs))
    assert 2 < len(eager_full) < STEPS and first_full == second_full == eager_full, (eager_full, first_full)
    for got in (first, second):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
