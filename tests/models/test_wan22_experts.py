"""Wan 2.2's two-expert pipelines (``transformer`` for high noise, ``transformer_2`` for low noise): the adapter side.

The adapter names both experts in the order a generation first calls them, and each expert's listed modules run
in order at the steps that expert serves. (One step count and one NFC budget over both experts are the runtime's
part: docs/custom-models.md, "Pipelines with several transformers".)
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402
from families import CASES, WAN_TINY, generate, wan_pipe  # noqa: E402

from relcache.models import find_adapter  # noqa: E402


def wan22_pipe() -> WanPipeline:
    """The tiny Wan pipeline with a second expert of the same config and the switch half-way (boundary_ratio)."""
    one = wan_pipe()
    torch.manual_seed(1)
    expert = WanTransformer3DModel(**WAN_TINY, cross_attn_norm=True).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=one.vae, scheduler=one.scheduler,
                       transformer=one.transformer, transformer_2=expert, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_adapter_lists_both_experts_in_the_order_a_generation_runs_them():
    pipe = wan22_pipe()
    adapter = find_adapter(pipe.transformer)
    assert find_adapter(pipe.transformer_2) is adapter
    experts = adapter.pipeline_transformers(pipe)
    assert [name for name, _ in experts] == ["transformer", "transformer_2"]
    assert experts[0][1] is pipe.transformer and experts[1][1] is pipe.transformer_2
    runs: list[str] = []
    handles = [model.register_forward_pre_hook(lambda *_, name=name: runs.append(name)) for name, model in experts]
    per_expert = {name: [m.name for m in adapter.cached_modules(model)] for name, model in experts}
    calls: dict[str, list[list[str]]] = {name: [] for name, _ in experts}
    for name, model in experts:
        handles.append(model.register_forward_pre_hook(lambda *_, name=name: calls[name].append([])))
        for spec in adapter.cached_modules(model):
            handles.append(spec.module.register_forward_pre_hook(
                lambda *_, name=name, spec=spec: calls[name][-1].append(spec.name)))
    try:
        generate(pipe, CASES["wan"], steps=6)
    finally:
        for h in handles:
            h.remove()
    first_low = runs.index("transformer_2")  # cond and uncond calls per step; the switch happens once
    assert 0 < first_low < len(runs) and set(runs[:first_low]) == {"transformer"}
    assert set(runs[first_low:]) == {"transformer_2"} and len(runs) == 12
    for name in per_expert:
        assert calls[name] and all(c == per_expert[name] for c in calls[name])


def test_a_single_expert_pipeline_lists_one():
    pipe = wan_pipe()  # Wan 2.1: transformer_2 is None
    assert [name for name, _ in find_adapter(pipe.transformer).pipeline_transformers(pipe)] == ["transformer"]
