"""Regional compilation (diffusers' ``compile_repeated_blocks``) against whole-model ``torch.compile``, with relcache.

Counts, not timings: on a small random FLUX transformer with more single-stream blocks than dynamo's recompile limit
(8 graphs per code object), each method runs one eager generation, then the same generation twice compiled (whole
model, or each repeated block on its own), with a backend that only records the graphs it is given. Reported per
method and mode: graphs compiled in the first and second compiled generation, graph breaks, the compiled variants
each block class's ``forward`` ended with, the times dynamo hit its recompile limit (the rest of that code then runs
eagerly: correct, not compiled), and the largest difference from the eager run. The "plain" rows run the model
without relcache, for comparison.

``--user-break`` puts a graph break of the user's at the end of every single-stream block's forward (as a custom
attention processor or an unsupported op would), for the whole-model compile: dynamo then compiles what follows each
break as resume functions, and the block classes' ``forward`` code gets compiled variants of its own (counted).

    python benchmarks/regional_compile.py                    # 2 double + 10 single blocks, 10 steps
    python benchmarks/regional_compile.py --single 4 --steps 6
    python benchmarks/regional_compile.py --user-break       # whole model only, a graph break in every single block
    python benchmarks/regional_compile.py --recompile-limit 64   # dynamo's limits raised: every variant compiles
    python benchmarks/regional_compile.py --recompile-limit 64 --regional --steps 30 --orders 1 2 3 4
                                                             # graphs per block class by forecast order
    python benchmarks/regional_compile.py --recompile-limit 64 --regional --steps 30 --orders 1 2 3 4 --pipeline

With ``--recompile-limit N`` dynamo's ``recompile_limit`` (and ``accumulated_recompile_limit``, where N is larger) are N
for the run, so that no block runs eagerly and the variants column gives how many graphs each block needs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import time
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import relcache
from relcache import FORA, RFC, CacheConfig, FasterCache, TaylorSeer

METHODS: dict[str, CacheConfig | None] = {"plain": None, "FORA": FORA(3), "TaylorSeer": TaylorSeer(3),
                                          "RFC": RFC(threshold=0.3)}


@contextlib.contextmanager
def user_break(on: bool) -> Iterator[None]:
    """With ``on``, every single-stream block's forward ends in a graph break (``torch._dynamo.graph_break``)."""
    if not on:
        yield
        return
    original = FluxSingleTransformerBlock.forward

    def forward(self: FluxSingleTransformerBlock, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        torch._dynamo.graph_break()
        return out

    FluxSingleTransformerBlock.forward = forward
    try:
        yield
    finally:
        FluxSingleTransformerBlock.forward = original


class _LimitHits(logging.Handler):
    """Counts dynamo's "recompile limit reached" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "limit" in record.getMessage():
            self.hits += 1


def build(single: int) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def step_inputs(i: int, steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 4, generator=g) * (1 - i / steps),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([1.0 - i / steps]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3), return_dict=False)


def generation(model: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    if relcache.is_enabled(model):
        relcache.begin_generation(model, steps)
    with torch.no_grad():
        return [model(**step_inputs(i, steps))[0] for i in range(steps)]


def pipeline(model: FluxTransformer2DModel) -> FluxPipeline:
    """A FluxPipeline around ``model`` (prompt embeddings given, no text encoders; a 2-block VAE: 16x16 images are
    4x4 packed latents, the 16 tokens of ``step_inputs``), whose calls add what a hand-written loop lacks: the
    pipeline's own tensor layouts. ``measure`` enables relcache afresh after the eager run, so that the compiled
    generations are the session's first and second, as a user's are."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), layers_per_block=1,
                        latent_channels=1, norm_num_groups=2, sample_size=16).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_generation(pipe: FluxPipeline, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = pipe(prompt_embeds=torch.randn(1, 6, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
               height=16, width=16, num_inference_steps=steps, max_sequence_length=6, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    return [out]


def measure(config: CacheConfig | None, mode: str, single: int, steps: int, in_pipeline: bool = False
            ) -> dict[str, Any]:
    model = build(single)
    pipe = pipeline(model) if in_pipeline else None
    target = model if pipe is None else pipe
    if config is not None:
        relcache.enable(target, config)

    def generation_of(run: torch.nn.Module) -> list[torch.Tensor]:
        if pipe is None:
            return generation(run, steps)
        pipe.transformer = run
        return pipeline_generation(pipe, steps)

    eager = generation_of(model)
    if pipe is not None and config is not None:  # compiled from a fresh enable, as a user's first generation is
        relcache.disable(target)
        relcache.enable(target, config)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)
        return gm.forward

    limits = _LimitHits()
    log = logging.getLogger("torch._dynamo.convert_frame")
    log.addHandler(limits)
    try:
        if mode == "regional":
            model.compile_repeated_blocks(backend=backend)
            run = model
        else:
            run = torch.compile(model, backend=backend)
        first = generation_of(run)
        n_first = len(graphs)
        second = generation_of(run)
    finally:
        log.removeHandler(limits)
        if pipe is not None:
            pipe.transformer = model
        if config is not None:
            relcache.disable(target)
    variants = {cls.__name__: len(_debug_get_cache_entry_list(cls.forward.__code__))
                for cls in (FluxTransformerBlock, FluxSingleTransformerBlock)}
    blocks = {"FluxTransformerBlock": 2, "FluxSingleTransformerBlock": single}
    variants = {name: f"{n} ({n / blocks[name]:.1f} per block)" for name, n in variants.items()}
    diff = max(float((a - b).abs().max()) for a, b in zip(eager, first + second, strict=False))
    torch._dynamo.reset()
    return dict(first=n_first, second=len(graphs) - n_first, breaks=sum(counters["graph_break"].values()),
                variants=variants, limit_hits=limits.hits, diff=diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=10, help="single-stream blocks (default 10, above the limit)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--recompile-limit", type=int, metavar="N",
                        help="dynamo's recompile_limit (and accumulated_recompile_limit, if larger) for the run")
    parser.add_argument("--user-break", action="store_true",
                        help="a graph break at the end of every single-stream block (whole-model compile only)")
    parser.add_argument("--regional", action="store_true", help="regional compilation only (no whole-model rows)")
    parser.add_argument("--pipeline", action="store_true",
                        help="each generation a FluxPipeline call around the model, not a hand-written loop")
    parser.add_argument("--orders", type=int, nargs="+", choices=range(1, 5), metavar="M",
                        help="instead of the default methods: FORA, FasterCache, then TaylorSeer N=3 and "
                        "RFC(target_nfc=steps // 3) at each forecast order M (1..4)")
    args = parser.parse_args()
    if args.single < 1 or args.steps < 4:
        parser.error("--single must be >= 1 and --steps >= 4")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"FLUX-like, 2 double + {args.single} single blocks, {args.steps} steps, recording backend"
          + (", a user's graph break in every single block" if args.user_break else "")
          + (f", recompile_limit {args.recompile_limit}" if args.recompile_limit else "")
          + (", FluxPipeline calls" if args.pipeline else ""))
    if args.recompile_limit:
        torch._dynamo.config.recompile_limit = args.recompile_limit
        config = torch._dynamo.config
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, args.recompile_limit)
    print("| method | compile | graphs, 1st gen | graphs, 2nd gen | graph breaks | compiled variants per block "
          "forward | recompile-limit hits | max diff vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    modes = ("whole model",) if args.user_break else ("regional",) if args.regional else ("whole model", "regional")
    methods = METHODS
    if args.orders:
        methods = {"FORA": FORA(3), "FasterCache": FasterCache()}
        for m in args.orders:
            methods[f"TaylorSeer m={m}"] = TaylorSeer(3, order=m)
            methods[f"RFC m={m}"] = RFC(target_nfc=max(2, args.steps // 3), order=m)
    for name, config in methods.items():
        for mode in modes:
            with user_break(args.user_break):
                r = measure(config, mode, args.single, args.steps, args.pipeline)
            variants = ", ".join(f"{k} {v}" for k, v in r["variants"].items())
            print(f"| {name} | {mode} | {r['first']} | {r['second']} | {r['breaks']} | {variants} | "
                  f"{r['limit_hits']} | {r['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
