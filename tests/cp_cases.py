"""Every caching method on tiny FLUX, Wan and the other families whose diffusers model declares a ``_cp_plan``,
run the same way in one process and under context parallelism (tests/runtime/test_context_parallel.py,
benchmarks/collectives.py).

Each case runs a generation with relcache enabled and returns the final latents and the full steps of each call
context. FLUX runs its pipeline (one "cond" call per step) and a hand-written loop on a CFG batch (conditional and
unconditional halves in one call, for CFG-Cache); Wan runs its pipeline, CFG as separate "cond"/"uncond" calls.
The families of ``LOOP_FAMILIES`` run their bare transformer in tests/families.py's ``LoopPipeline``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import families
import torch

import relcache
from relcache import CacheConfig, CFGCache, InputError, Interval, Relational, Reuse, Taylor

STEPS = 8
#: thresholds between the accumulated errors of consecutive steps (one process), so decisions are not borderline
FLUX_TAU, WAN_TAU = 0.3, 0.3
#: the other families with a ``_cp_plan`` (diffusers 0.42.1) relcache supports, by their tests/families.py name:
#: (RCS threshold, the methods run; None: all). Every token count (image and text) of their tiny instances splits
#: evenly over 2 processes. Helios has 40 blocks (``helios_pipe``), so it runs three methods only.
#: LTX-Video as its pipeline calls it (with an encoder attention mask) fails under context parallelism in diffusers
#: itself (``ltx_plain_error``); "ltx-nomask" is its transformer without the mask, which diffusers runs.
LOOP_FAMILIES: dict[str, tuple[float, tuple[str, ...] | None]] = {
    "flux2": (0.3, None), "qwen_image": (0.3, None), "chronoedit": (0.3, None),
    "ltx-nomask": (0.3, None), "helios": (0.3, ("RFC-threshold", "RFC-target_nfc", "TaylorSeer")),
}


def configs(tau: float) -> dict[str, CacheConfig]:
    """Every method, named."""
    return {
        "FORA": relcache.FORA(interval=2, warmup=2),
        "TaylorSeer": relcache.TaylorSeer(interval=3, order=2, warmup=2),
        "RFE": CacheConfig(Relational(2), Interval(3, 2)),
        "RCS": CacheConfig(Reuse(), InputError(threshold=tau, order=1)),
        "RFC-threshold": relcache.RFC(threshold=tau),
        "RFC-target_nfc": relcache.RFC(target_nfc=4),
        # the CFG-Cache schedule counted from the window, without forced full attention: something is skipped in
        # a few steps
        "FasterCache": relcache.FasterCache(interval=2, warmup=2, cfg_interval=2, cfg_window=(0.25, 1.0),
                                            cfg_phase="window", cfg_refresh_full=False),
    }


def cfg_batch_configs() -> dict[str, CacheConfig]:
    """CFG-Cache on a CFG batch, with an elementwise and a relational predictor, each skipping unconditional halves
    in ``flux_cfg_loop`` (one process: TaylorSeer at step 5, RFC at 3 steps). With ``interval=2`` and ``align``
    both skipped nothing there (every full step in the window was a refresh), so context parallelism's skips went
    untested (found by review); ``test_context_parallel`` checks that each skips."""
    aligned = CFGCache(interval=3, window=(0.25, 1.0), skip_full=True)
    paper = CFGCache(interval=2, window=(0.25, 1.0), align=False)  # RFC here has one full step in the window
    return {
        "TaylorSeer+CFG-Cache": CacheConfig(Taylor(2), Interval(2, 2), cfg_cache=aligned),
        "RFC+CFG-Cache": CacheConfig(Relational(2), InputError(threshold=FLUX_TAU), cfg_cache=paper),
    }


def latents(pipe: Any, case: families.Case, seed: int = 0) -> torch.Tensor:
    out = pipe(**case.kwargs(), num_inference_steps=STEPS, generator=torch.manual_seed(seed), output_type="latent")
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images).float()


def flux_cfg_loop(transformer: Any, steps: int = STEPS) -> torch.Tensor:
    """``steps`` Euler steps of FLUX's transformer on a CFG batch: equal latents, negative then positive prompt.
    (Under context parallelism diffusers' split hook on the transformer accepts only tensor outputs:
    ``return_dict=False``.)"""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, generator=gen)
    emb, neg = families.t5_embeds(16)
    pool, npool = families.clip_pooled(16)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.reshape(-1), cols.reshape(-1)], dim=1)
    txt_ids = torch.zeros(emb.shape[1], 3)
    relcache.begin_generation(transformer, steps)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 1.0 - i / steps)
            out = transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([neg, emb]),
                              pooled_projections=torch.cat([npool, pool]), timestep=t, img_ids=img_ids,
                              txt_ids=txt_ids, guidance=torch.full((2,), 3.5), return_dict=False)[0]
            uncond, cond = out.chunk(2)
            x = x - (uncond + 4.0 * (cond - uncond)) / steps
    return x


Run = Callable[[], torch.Tensor]


def helios_pipe() -> families.LoopPipeline:
    """tests/families.py's tiny Helios with 40 blocks instead of 2: diffusers' ``HeliosTransformer3DModel._cp_plan``
    names ``blocks.0`` to ``blocks.39`` (Helios' depth), and ``enable_parallelism`` refuses a model with fewer blocks
    (``ValueError: '2' is not a submodule of 'ModuleList'``)."""
    torch.manual_seed(0)
    tiny = {k: v for k, v in families.WAN_TINY.items() if k != "rope_max_seq_len"} | {"num_layers": 40}
    model = diffusers.HeliosTransformer3DModel(**tiny, rope_dim=(4, 2, 2))
    text = families.randn(1, 6, 16)
    return families.LoopPipeline(model, lambda x, t, _: dict(hidden_states=x, timestep=t, encoder_hidden_states=text),
                                 (1, 4, 2, 4, 4))


def ltx_nomask_pipe() -> families.LoopPipeline:
    """tests/families.py's tiny LTX-Video called without ``encoder_attention_mask`` (its mask is all
    ones: every text token valid): the mask is what diffusers' Ulysses attention fails on (``ltx_plain_error``)."""
    pipe = families.CASES["ltx"].build()
    inputs = pipe.inputs
    pipe.inputs = lambda x, t, ctx: inputs(x, t, ctx) | {"encoder_attention_mask": None}
    return pipe


def loop_pipes() -> dict[str, Any]:
    """The tiny pipeline of each of ``LOOP_FAMILIES``."""
    special = {"helios": helios_pipe, "ltx-nomask": ltx_nomask_pipe}
    return {name: special[name]() if name in special else families.CASES[name].build() for name in LOOP_FAMILIES}


def runs(flux_pipe: Any, wan_pipe: Any, loops: dict[str, Any] | None = None) -> dict[str, tuple[Any, Run]]:
    """(what relcache is enabled on, how to run one generation) per family; ``loops``: ``loop_pipes()`` or a part."""
    flux, wan = families.CASES["flux"], families.CASES["wan"]
    out: dict[str, tuple[Any, Run]] = {
        "flux": (flux_pipe, lambda: latents(flux_pipe, flux)),
        "wan": (wan_pipe, lambda: latents(wan_pipe, wan)),
        "flux-cfg-batch": (flux_pipe.transformer, lambda: flux_cfg_loop(flux_pipe.transformer)),
    }
    for name, pipe in (loops or {}).items():
        case = families.CASES[name.removesuffix("-nomask")]
        out[name] = (pipe, lambda pipe=pipe, case=case: latents(pipe, case))
    return out


def cases() -> list[tuple[str, str, CacheConfig]]:
    """(family, method, config) of every case."""
    out = [("flux", name, c) for name, c in configs(FLUX_TAU).items()]
    out += [("wan", name, c) for name, c in configs(WAN_TAU).items()]
    out += [("flux-cfg-batch", name, c) for name, c in cfg_batch_configs().items()]
    out += [(family, name, c) for family, (tau, methods) in LOOP_FAMILIES.items()
            for name, c in configs(tau).items() if methods is None or name in methods]
    return out


def run_all(flux_pipe: Any, wan_pipe: Any, loops: dict[str, Any] | None = None, only: list[str] | None = None,
            ) -> dict[str, tuple[torch.Tensor, dict[str, list[int]], dict[str, dict[int, float]], int]]:
    """``family/method`` -> (final latents, full steps per context, input errors per context, skips) of every case of
    the families given, plus ``family/plain`` without caching."""
    results = {}
    families_runs = runs(flux_pipe, wan_pipe, loops)
    for family, (_, run) in families_runs.items():
        if only is None or f"{family}/plain" in only:
            results[f"{family}/plain"] = (run(), {}, {}, 0)
    for family, name, config in cases():
        key = f"{family}/{name}"
        if family in families_runs and (only is None or key in only):
            results[key] = run_one(*families_runs[family], config)
    return results


def ltx_plain_error() -> str | None:
    """The error of tests/families.py's tiny LTX-Video (no relcache, called with its encoder attention mask as
    LTXPipeline calls it) under Ulysses degree 2, None if it runs. In diffusers 0.42.1 LTXVideoAttnProcessor expands
    the mask per head (``prepare_attention_mask``: (batch, heads, 1, text tokens)); TemplatedUlyssesAttention gathers
    it over the text tokens but keeps every head while each process holds heads / 2, and SDPA raises."""
    from diffusers import ContextParallelConfig

    pipe = families.CASES["ltx"].build()
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    try:
        latents(pipe, families.CASES["ltx"])
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}"
    return None


def run_one(target: Any, run: Run, config: CacheConfig,
            ) -> tuple[torch.Tensor, dict[str, list[int]], dict[str, dict[int, float]], int]:
    """(final latents, full steps per context, input errors per context, unconditional halves or calls skipped) of
    ``run`` with ``config`` on ``target``; the stats as they stand after the last transformer call (the pipeline frees
    the caches at its end)."""
    relcache.enable(target, config)
    try:
        seen: list[relcache.CacheStats] = []
        model = target if isinstance(target, torch.nn.Module) else target.transformer
        handle = model.register_forward_hook(lambda *_: seen.append(relcache.stats(target)))
        try:
            out = run()
        finally:
            handle.remove()
    finally:
        relcache.disable(target)
    stats = seen[-1]
    return (out, {n: c.full_steps for n, c in stats.contexts.items()},
            {n: c.input_errors for n, c in stats.contexts.items()}, stats.uncond_skipped)
