"""What relcache's own Python costs an eager step where the host sets the pace (a launch-bound GPU).

DiT at XL depth (28 blocks) and a tiny width on one CPU thread, so that each kernel costs little and a step's time
is mostly dispatch and Python. Each block keeps its own timestep-and-class embedder with its own random weights, so
relcache's shared copies (``runtime/shared.py``) do not apply and every row runs the same modules. Timed, medians
of interleaved repeats (the 12 steps after 4 full ones of a 16-step run):
- the plain model's step, against relcache computing every step (``FORA(1, 1)``): relcache's cost at a full step;
- the plain model with a diffusers hook on each cached module that only calls the original forward: what the hook
  registry itself costs;
- a minimal hand-written reuse (each block's ``attn1`` and ``ff`` forward replaced by "return the last output" at
  cached steps, nothing else), against relcache's FORA cached step: relcache's cost at a cached step;
- relcache's Taylor (order 2) and Relational (RFE, order 2) cached steps, on the same interval schedule: what their
  forecasts add to FORA's, operators and Python together (RFC's cached steps forecast as RFE's do).
The last column counts the ATen operators one such step dispatches (views included), so that what relcache adds
shows as Python or as operators.

    python benchmarks/host_bound.py --repeats 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch.utils._python_dispatch import TorchDispatchMode

import relcache
from relcache import FORA, CacheConfig, Interval, Relational, Reuse, Taylor

STEPS, CACHED_FROM = 16, 4


def build() -> DiTTransformer2DModel:
    """XL depth, tiny width, each block's timestep-and-class embedder its own (random weights: not shared)."""
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()


class _PassThrough(ModelHook):
    """A diffusers hook that only calls the module's original forward."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.fn_ref.original_forward(*args, **kwargs)


def pass_through_hooks(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """``model`` with a ``_PassThrough`` hook on each block's ``attn1`` and ``ff`` (the modules relcache caches)."""
    for block in model.transformer_blocks:
        for module in (block.attn1, block.ff):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_PassThrough(), "pass_through")
    return model


def minimal_reuse(model: DiTTransformer2DModel) -> dict[str, bool]:
    """Replace each block's ``attn1`` and ``ff`` forward by "compute and keep, or return the kept output"."""
    switch = {"cached": False}
    kept: dict[int, Any] = {}

    def wrap(module: torch.nn.Module) -> None:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if switch["cached"]:
                return kept[id(module)]
            kept[id(module)] = out = original(*args, **kwargs)
            return out

        module.forward = forward

    for block in model.transformer_blocks:
        wrap(block.attn1)
        wrap(block.ff)
    return switch


class _Ops(TorchDispatchMode):
    """Counts the ATen operators dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def _run(model: DiTTransformer2DModel, switch: dict[str, bool] | None, count_last: bool = False) -> list[float]:
    """One ``STEPS``-step run, cached from step ``CACHED_FROM``: each step's time in ms, or with ``count_last`` the
    ATen operators of the last step (untimed) as a one-element list."""
    if relcache.is_enabled(model):
        relcache.begin_generation(model, STEPS)
    x, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    times = []
    with torch.no_grad():
        for i in range(STEPS):
            if switch is not None:
                switch["cached"] = i >= CACHED_FROM
            t = torch.tensor([999 - 60 * i] * 2)
            if count_last and i == STEPS - 1:
                with _Ops() as mode:
                    model(x, timestep=t, class_labels=labels, return_dict=False)
                return [mode.n]
            start = time.perf_counter()
            model(x, timestep=t, class_labels=labels, return_dict=False)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def cached_step_ms(model: DiTTransformer2DModel, switch: dict[str, bool] | None) -> float:
    """The median time of the steps after the first ``CACHED_FROM`` of one run, in ms."""
    return statistics.median(_run(model, switch)[CACHED_FROM:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    every = build()
    relcache.enable(every, FORA(1, 1))
    cached = {}
    for name, predictor in (("FORA", Reuse()), ("Taylor", Taylor(2)), ("RFE", Relational(2))):
        cached[name] = build()  # 4 full steps, then cached ones: Taylor's and RFE's second differences exist
        relcache.enable(cached[name], CacheConfig(predictor, Interval(1000, CACHED_FROM)))
    mini = build()
    runs = {"plain step": (build(), None), "plain step, a pass-through hook per cached module":
            (pass_through_hooks(build()), None), "relcache, every step full": (every, None),
            "minimal reuse, cached step": (mini, minimal_reuse(mini)),
            **{f"relcache {name}, cached step": (model, None) for name, model in cached.items()}}
    for model, switch in runs.values():  # warm-up
        cached_step_ms(model, switch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved
        for name, (model, switch) in runs.items():
            times[name].append(cached_step_ms(model, switch))
    ms = {name: statistics.median(v) for name, v in times.items()}
    machine = platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine}, torch {torch.__version__}, 1 thread; DiT, 28 blocks, "
          f"hidden 16, batch 2, medians of {args.repeats}")
    print("| step | ms | ATen operators |\n|---|---|---|")
    for name, v in ms.items():
        print(f"| {name} | {v:.3f} | {_run(*runs[name], count_last=True)[0]} |")
    hooks = ms["plain step, a pass-through hook per cached module"] - ms["plain step"]
    full = ms["relcache, every step full"] - ms["plain step"]
    cached = ms["relcache FORA, cached step"] - ms["minimal reuse, cached step"]
    modules = 2 * len(mini.transformer_blocks)  # attn1 and ff of each block
    print(f"\ndiffusers' hook registry on the {modules} modules: {hooks:+.3f} ms")
    print(f"relcache's cost at a full step: {full:+.3f} ms ({full / ms['plain step']:+.1%} of a plain step)")
    print(f"relcache's cost at a FORA cached step: {cached:+.3f} ms "
          f"({cached / ms['minimal reuse, cached step']:+.1%} of the minimal reuse step)")
    for name in ("Taylor", "RFE"):
        extra = ms[f"relcache {name}, cached step"] - ms["relcache FORA, cached step"]
        print(f"{name}'s forecasts over FORA's reuse: {extra:+.3f} ms a cached step "
              f"({extra / modules * 1e3:+.1f} µs a module)")

if __name__ == "__main__":
    main()
