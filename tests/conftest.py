"""Tiny models built from configs (random weights): nothing is downloaded."""

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from packaging.version import Version

if not torch.cuda.is_available():
    # Triton's CPU interpreter runs the fused RFE forecast's kernels here (tests/methods/test_fused.py). It must be
    # chosen before triton is first imported: kernels and triton.language's own helpers are built for it then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead (and contend under xdist)


def release(version: str) -> tuple[int, int]:
    """A package's ``major.minor`` as numbers (``"2.15.0a0+git"`` gives ``(2, 15)``): tests whose expectation
    depends on the torch or Triton release compare these, not strings ("2.9" > "2.15")."""
    major, minor = Version(version).release[:2]
    return major, minor


TORCH_RELEASE = release(torch.__version__)


def recording_backend(graphs: list[torch.fx.GraphModule]):  # noqa: ANN201 (dynamo's backend signature)
    """A dynamo backend that only appends each graph it is given to ``graphs`` and runs it as traced: what the compile
    tests count (tracing, guards, recompilations) without code generation, which would take minutes here."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    return backend


def tie_embeddings(model: DiTTransformer2DModel) -> None:
    """What diffusers' DiT conversion does: every block's norm1.emb holds the original DiT's one embedder."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)


def tiny_dit(seed: int = 0, num_classes: int = 1000, layers: int = 3) -> DiTTransformer2DModel:
    """A DiT-XL/2-shaped transformer, small: 3 blocks, width 32, 4x8x8 latents (16 tokens), embedding copies
    tied like a converted checkpoint's."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=4,
    ).eval()
    tie_embeddings(model)
    # adaLN-zero starts with zero gates, which would make every block an identity: randomise them
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.2)
            block.norm1.linear.bias.normal_(0, 0.2)
    return model


@pytest.fixture
def dit() -> DiTTransformer2DModel:
    return tiny_dit()


def dit_pipe(scheduler: DDIMScheduler | None = None) -> DiTPipeline:
    """A DiTPipeline around ``tiny_dit`` with a tiny VAE; DDIM unless ``scheduler`` is given."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
        sample_size=8,
    ).eval()
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    pipeline = DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def pipe() -> DiTPipeline:
    return dit_pipe()


def dit_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded latents for ``tiny_dit`` (``batch`` of 4x8x8) and class labels."""
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([1, 7, 3, 5][:batch])


def run_loop(model, x, labels, steps=12, begin=True, timesteps=None, around=None):
    """A hand-written DDIM-like loop calling the bare transformer once per step (CFG batched by the caller);
    ``around(i)``, where given, is a context manager entered around step ``i``'s call alone."""
    import relcache

    if begin:
        relcache.begin_generation(model, steps)
    outs = []
    ts = timesteps if timesteps is not None else [999 - i * (999 // steps) for i in range(steps)]
    with torch.no_grad():
        for i, t in enumerate(ts):
            t = torch.full((x.shape[0],), t)
            with around(i) if around is not None else contextlib.nullcontext():
                out = model(x, timestep=t, class_labels=labels).sample
            outs.append(out)
            x = x - 0.05 * out + 0.01 * i
    return outs


def count_eager_calls(model: DiTTransformer2DModel) -> list[int]:
    """A list that grows by one each time the model's last projection runs eagerly (outside a compiled graph: traced
    code folds ``is_compiling`` to True and drops the append). The last, not the first block: an RCS pre-pass that
    runs eagerly (CFG-Cache's plan asks for the decision) runs the first block's start."""
    calls: list[int] = []

    def count(module: torch.nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling():
            calls.append(1)

    model.proj_out_2.register_forward_pre_hook(count)
    return calls


#: the test files whose tests run their own functions in other processes (gloo groups): the fork server imports each
FORKED = ("runtime/test_context_parallel.py", "evaluation/test_bench_cli.py")


def start_fork_server() -> None:
    """Start this process's fork server (once) with the ``FORKED`` modules imported: processes forked from it start
    in a moment, where each spawned one imported diffusers (about 6 s, most of a minute on a busy machine), and none
    inherits the test process's threads (a child forked from it once aborted in malloc under xdist).

    (choice) The server swallows an ImportError of a module it preloads, and CPython started it without the parent's
    ``sys.path`` (this machine's 3.11.7, and 3.12.1 and 3.13.0 likewise; CPython issue gh-117378, fixed in November
    2024 with backports to 3.12 and 3.13, names this same workaround): the test modules, found through the
    directories pytest puts there, failed to import in it, silently. It starts with those directories on
    ``PYTHONPATH``; the test process's own is restored after. The server, and every process forked
    from it, keeps the environment it started with (those directories included): a variable set later reaches no
    child. (The children get the parent's ``sys.path`` from multiprocessing itself.)"""
    from multiprocessing import forkserver

    import torch.multiprocessing as mp

    tests = Path(__file__).resolve().parent
    paths = list(dict.fromkeys([str(tests), *(str((tests / f).parent) for f in FORKED)]))
    mp.get_context("forkserver").set_forkserver_preload([Path(f).stem for f in FORKED])
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([previous] if previous else [])])
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


#: inductor's CPU code is C++: tests that compile with inductor (not ``aot_eager``) need a compiler
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                               reason="inductor's CPU backend needs a C++ compiler")


#: the files whose tests take longest (torch.compile tracing, spawned processes): run first, so that with ``-n 2`` the
#: last tests to finish are short ones and both workers end together (sorted last, they left one worker running
#: compile tests alone for minutes). This needs ``--dist worksteal`` (pyproject's addopts): under xdist's default
#: ``load`` schedule the first round-robin batch queued 203 of these on one worker, which ran them alone for 400 s
#: after the other had finished every other test (2026-12-06: 626-650 s in all, against 524 s with worksteal)
#: The context-parallel file comes first, so that one worker runs every test of it and sets up its module fixtures
#: (the parallel job and its one-process reference, about 20 s) once. Split between the workers (work is stolen from
#: the end of a queue), each worker set up the fixtures its tests reached (2026-12-07: three setups, 68 s in all)
HEAVY_FIRST = ("runtime/test_context_parallel.py", "runtime/test_compile.py", "runtime/test_capture.py",
               "models/test_compile_families.py", "models/test_cosmos3.py", "evaluation/test_bench_cli.py",
               "runtime/test_cache_memory.py", "runtime/test_cfg_cache.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy files first, each file's tests in their own order (the same order in every xdist worker)."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(HEAVY_FIRST) if path.endswith(name)), len(HEAVY_FIRST))

    items.sort(key=rank)
