"""Speed at FLUX.1-dev scale (random weights): relcache's methods against diffusers' own caches, one run.

A FLUX.1-dev-shaped transformer (19 double and 38 single blocks, hidden 3072, 24 heads, guidance embedding), built
directly on the device in bfloat16 with random weights, generates at 1024x1024 (4,096 image tokens, 512 text
tokens) with 28 Euler steps, batch 1 (FLUX.1-dev is guidance-distilled: no CFG batch). For full computation,
FORA, TaylorSeer and RFC at about 3.5x and 7x fewer full steps (every method of a row at the same NFC: 8 and 4 of
28; the NFC of each row is printed first), diffusers' TaylorSeer cache at the same NFC, and diffusers' First-Block
caches on the same model, it reports wall time, speed-up, % of the ideal T/NFC, NFC (counted where the last double
block's attention really ran), peak memory and relcache's cache bytes.

diffusers' TaylorSeer is set like for like: it caches the modules relcache's FLUX adapter caches (the joint
attention, ``ff`` and ``ff_context``; the single blocks' ``attn`` and ``proj_mlp``, via ``cache_identifiers``: its
default caches attention only) at order 2 with factors in the model's dtype. Its schedule cannot give relcache's
full steps (it predicts the step right after its warm-up), so a row "TaylorSeer Rx, diffusers' steps" runs relcache's
TaylorSeer on exactly diffusers' full steps beside it. ``--check-modules`` times nothing and shows, per method, at
which steps each cached module really computed, and fails unless each such pair computes the same modules at the
same steps.

Eager rows are interleaved per repeat (every round times each method once, in turn); medians. Each method is enabled
afresh in every round and primed with one untimed call (relcache's FLOP measurement); each generation's time is
printed as it ends and the JSON is written after every round, so a run cut short keeps what it measured. Compiled
rows (``--compile``) are not interleaved: each method is compiled once and timed ``--repeats`` times back to back,
then the next (a compiled model holds one method's hooks, and a copy of the model per method does not fit a GPU at
FLUX.1-dev's size), so a drift of the machine's speed during the run falls on the methods unevenly.

    python benchmarks/flux_speed.py --out flux.json   # on a GPU (an estimated 3-5 s a generation on an H200)
    python benchmarks/flux_speed.py --compile default --methods "RFC 3.5x"   # compiled rows (minutes to compile)
    python benchmarks/flux_speed.py --smoke                               # rehearsal on the CPU, tiny shapes
    python benchmarks/flux_speed.py --cpu --repeats 3   # a FLUX-like model a 2-core CPU times in minutes
    python benchmarks/flux_speed.py --cpu --check-modules   # which modules each method computes at which steps

``--cpu`` is not FLUX.1-dev's scale: 2 double and 4 single blocks, hidden 384 (6 heads of 64), 576 image and 64
text tokens, float32, the same 28 steps and methods. It answers on a machine without a GPU what the GPU run asks:
does RFC keep up with TaylorSeer and diffusers' own caches at the same NFC, where compute, not launches, decides.
``--smoke`` (8 steps) has one row, NFC 2: the warm-up's full steps only, a rehearsal of the code paths.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FirstBlockCacheConfig, FluxTransformer2DModel, TaylorSeerCacheConfig

import relcache
from relcache import FORA, RFC, CacheConfig, Interval, Taylor, TaylorSeer

FULL = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
CPU = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
           joint_attention_dim=512, pooled_projection_dim=64, axes_dims_rope=(8, 28, 28))
TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def build(shape: dict[str, Any], device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    """A FLUX transformer with random weights, created on ``device`` in ``dtype`` (no float32 copy of 12B)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **shape)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def inputs(model: FluxTransformer2DModel, image_tokens: int, text_tokens: int, device: str, dtype: torch.dtype,
           ) -> dict[str, torch.Tensor]:
    """One prompt's fixed inputs (the latents are passed separately)."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        img_ids=img_ids.reshape(-1, 3).to(device, dtype), txt_ids=torch.zeros(text_tokens, 3, device=device,
                                                                              dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32))


def generate(model: FluxTransformer2DModel, fixed: dict[str, torch.Tensor], image_tokens: int, steps: int,
             device: str, dtype: torch.dtype, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """One Euler flow-matching generation of ``steps`` steps (sigmas from 1 to 0), like FluxPipeline's loop;
    ``on_step(i)`` runs before step ``i`` (``--check-modules``)."""
    plain = getattr(model, "_orig_mod", model)
    if relcache.is_enabled(plain):
        relcache.begin_generation(plain, steps)
    else:  # diffusers' caches: a new generation (what FluxPipeline's end of call does)
        plain._reset_stateful_cache()
    x = torch.randn(1, image_tokens, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad(), plain.cache_context("cond"):  # as FluxPipeline calls it
        for i in range(steps):
            if on_step is not None:
                on_step(i)
            v = model(hidden_states=x, timestep=sigmas[i].expand(1).to(device, dtype), return_dict=False,
                      **fixed)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    if device == "cuda":
        torch.cuda.synchronize()
    return x


class _AttentionRuns:
    """Counts the steps at which the last double block's attention really computed (its ``to_q`` ran): the NFC of
    relcache and of diffusers' caches alike. The count is a tensor incremented in place, so compiled code traces
    the hook without guarding on a Python number that changes every step."""

    def __init__(self, model: FluxTransformer2DModel) -> None:
        layer = model.transformer_blocks[-1].attn.to_q
        self.runs = torch.zeros((), dtype=torch.int64, device=layer.weight.device)
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.runs.add_(1)

    @property
    def count(self) -> int:
        return int(self.runs)

    def reset(self) -> None:
        self.runs.zero_()



def prime(model: FluxTransformer2DModel, fixed: dict[str, torch.Tensor], image_tokens: int, steps: int,
          device: str, dtype: torch.dtype) -> None:
    """One untimed call right after an enable: relcache measures FLOPs at the first call of each input shape, once
    per enable, which a serving process pays once (as speed.py's ``prime``)."""
    if relcache.is_enabled(model):
        relcache.begin_generation(model, steps)
    x = torch.zeros(1, image_tokens, 64, device=device, dtype=dtype)
    with torch.no_grad(), model.cache_context("cond"):
        model(hidden_states=x, timestep=torch.ones(1, device=device, dtype=dtype), return_dict=False, **fixed)


def table_rows(mode: str | None, times: dict[str, list[float]], info: dict[str, dict[str, Any]], steps: int,
               ) -> list[dict[str, Any]]:
    """The rows of the methods timed so far (medians), against the plain model's time; none before it is timed."""
    if not times.get("full"):
        return []
    t_full = statistics.median(times["full"])
    rows = []
    for name, ts in times.items():
        if not ts:
            continue
        t, nfc = statistics.median(ts), info[name]["nfc"]
        ideal = steps / nfc if nfc else float("nan")
        rows.append(dict(method=name, compile=mode or "eager", time_s=t, speedup=t_full / t, ideal=ideal,
                         pct_of_ideal=100 * (t_full / t) / ideal, steps=steps, repeats=len(ts), **info[name]))
    return rows

#: diffusers module names of what relcache's FLUX adapter caches (``double_stream``: the joint attention and the two
#: MLPs; ``single_stream``: the attention and the MLP's input matmul, src/relcache/models/flux.py), for diffusers'
#: TaylorSeer's ``cache_identifiers`` (its default hooks only attention: the MLPs then run at every step)
FLUX_CACHED = (r"transformer_blocks\.\d+\.(attn|ff|ff_context)", r"single_transformer_blocks\.\d+\.(attn|proj_mlp)")


def _nfc(schedule: Interval, steps: int) -> int:
    return len(schedule.full_steps(steps))


def plan(steps: int) -> dict[str, tuple[int, int, tuple[int, int] | None]]:
    """ratio -> (interval N of relcache's FORA and TaylorSeer, their NFC K over ``steps``, diffusers' TaylorSeer's
    (interval, warm-up) with the same NFC K, or None where none has it). N is the interval whose NFC is nearest
    ``steps / ratio`` (at least 2); RFC aims at K, so every method of a row spends the same number of full steps. A
    ratio whose K an earlier one already took adds no rows (few steps)."""
    out: dict[str, tuple[int, int, tuple[int, int] | None]] = {}
    taken: set[int] = set()
    for ratio in ("3.5", "7"):  # NFC 8 and 4 of 28 steps
        budget = max(round(steps / float(ratio)), 2)
        n = min(range(2, steps + 1), key=lambda m: (abs(_nfc(Interval(m, 2), steps) - budget), m))
        k = _nfc(Interval(n, 2), steps)
        if k in taken:
            continue
        taken.add(k)
        # diffusers' schedule computes steps 0..w-1, predicts step w, then computes w+1, w+1+N, ... (relcache's
        # Interval(N, w, phase="diffusers")): the (N, w) of NFC K nearest relcache's interval, warm-up 2 first
        peer = min(((m, w) for w in (2, 1) for m in range(2, steps + 1)
                    if _nfc(Interval(m, w, phase="diffusers"), steps) == k),
                   key=lambda mw: (abs(mw[0] - n), -mw[1]), default=None)
        out[ratio] = (n, k, peer)
    return out


def methods(steps: int, count_flops: bool = True, dtype: torch.dtype = torch.float32,
            ) -> dict[str, tuple[Callable[[Any], None], Callable[[Any], None]]]:
    """name -> (attach, detach): relcache's at NFC about T/3.5 and T/7 (every method of a ratio at the same NFC),
    diffusers' TaylorSeer at that NFC on the modules relcache caches, at order 2, with relcache's TaylorSeer on
    diffusers' very full steps beside it, and diffusers' First-Block caches."""
    def rel(config: relcache.CacheConfig) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
        return (lambda m: relcache.enable(m, config, count_flops=count_flops)), relcache.disable

    def peer(config: Any) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
        return (lambda m: m.enable_cache(config)), (lambda m: m.disable_cache())

    out: dict[str, tuple[Callable[[Any], None], Callable[[Any], None]]] = {"full": (lambda m: None, lambda m: None)}
    for ratio, (n, k, sched) in plan(steps).items():
        out[f"FORA {ratio}x"] = rel(FORA(n))
        out[f"TaylorSeer {ratio}x"] = rel(TaylorSeer(n, 2))
        out[f"RFC {ratio}x"] = rel(RFC(order=2, target_nfc=k))
        if sched is not None:
            m, w = sched
            # the like-for-like pair: the same modules, the same full steps, the same order, factors in the model's
            # dtype (diffusers' default is bfloat16)
            twin = CacheConfig(Taylor(2), Interval(m, w, phase="diffusers"))
            out[f"TaylorSeer {ratio}x, diffusers' steps"] = rel(twin)
            out[f"diffusers TaylorSeer {ratio}x"] = peer(TaylorSeerCacheConfig(
                cache_interval=m, disable_cache_before_step=w, max_order=2, taylor_factors_dtype=dtype,
                cache_identifiers=list(FLUX_CACHED)))
    out["diffusers First-Block 0.05"] = peer(FirstBlockCacheConfig(threshold=0.05))
    out["diffusers First-Block 0.2"] = peer(FirstBlockCacheConfig(threshold=0.2))
    return out


class _ModuleRuns:
    """Which of FLUX's cached modules (and, for contrast, the single blocks' uncached ``proj_out``) really computed
    at each step: every ``F.linear`` call is matched to its weight, so a module whose output was forecast (its
    forward skipped, whoever's hook skipped it) does not count, while forward hooks would still fire on it."""

    GROUPS = {"double.attn": r"transformer_blocks\.\d+\.attn\.to_q", "double.ff": r"transformer_blocks\.\d+\.ff\..*",
              "double.ff_context": r"transformer_blocks\.\d+\.ff_context\..*",
              "single.attn": r"single_transformer_blocks\.\d+\.attn\.to_q",
              "single.proj_mlp": r"single_transformer_blocks\.\d+\.proj_mlp",
              "single.proj_out": r"single_transformer_blocks\.\d+\.proj_out"}

    def __init__(self, model: FluxTransformer2DModel) -> None:
        import re
        self.owner: dict[int, tuple[str, str]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                group = next((g for g, pat in self.GROUPS.items() if re.fullmatch(pat, name)), None)
                if group is not None:
                    self.owner[id(mod.weight)] = (group, name)
        self.step = -1
        self.runs: dict[str, dict[str, list[int]]] = {}  # group -> module -> steps it computed

    def table(self) -> dict[str, list[int]]:
        """group -> the steps at which every module of the group computed; raises if a group's modules disagree."""
        out = {}
        for group, mods in sorted(self.runs.items()):
            seen = {tuple(v) for v in mods.values()}
            if len(seen) != 1:
                raise AssertionError(f"{group}: its modules computed at different steps: {mods}")
            out[group] = sorted(seen.pop())
        return out

    def mode(self) -> Any:
        runs, owner = self.runs, self.owner

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(mode, func, types, args=(), kwargs=None):  # noqa: N805
                if func is torch.nn.functional.linear:
                    weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
                    hit = owner.get(id(weight))
                    if hit is not None:
                        steps = runs.setdefault(hit[0], {}).setdefault(hit[1], [])
                        if not steps or steps[-1] != self.step:
                            steps.append(self.step)
                return func(*args, **(kwargs or {}))

        return Mode()


def check_modules(model: FluxTransformer2DModel, table: dict[str, tuple[Callable[[Any], None], Callable[[Any], None]]],
                  fixed: dict[str, torch.Tensor], image_tokens: int, steps: int, device: str, dtype: torch.dtype,
                  ) -> dict[str, Any]:
    """Runs one generation of every method with each cached module's real computations recorded per step; prints,
    per method, at which steps each module group computed, and checks that each diffusers TaylorSeer row computes
    exactly the modules and steps of relcache's TaylorSeer on its steps (and their final latents' difference)."""
    found: dict[str, Any] = {}
    finals: dict[str, torch.Tensor] = {}
    for name, (attach, detach) in table.items():
        runs = _ModuleRuns(model)
        attach(model)
        try:
            prime(model, fixed, image_tokens, steps, device, dtype)
            with runs.mode():
                finals[name] = generate(model, fixed, image_tokens, steps, device, dtype,
                                        on_step=lambda i, runs=runs: setattr(runs, "step", i))
        finally:
            detach(model)
            gc.collect()
        found[name] = runs.table()
        per_group = "; ".join(f"{g} {len(s)}: {s}" for g, s in found[name].items())
        print(f"  {name}: {per_group}", flush=True)
    problems = []
    for name in table:
        if name.startswith("diffusers TaylorSeer "):
            twin = f"TaylorSeer {name.removeprefix('diffusers TaylorSeer ')}, diffusers' steps"
            same = found[name] == found[twin]
            diff = (finals[name] - finals[twin]).abs().max().item() / finals[twin].abs().max().item()
            print(f"{name} against {twin}: same modules at the same steps: {same}; final latents' max difference "
                  f"{diff:.2e} of their max", flush=True)
            if not same:
                problems.append(name)
    rel_cached = [g for g in _ModuleRuns.GROUPS if g != "single.proj_out"]
    for name, groups in found.items():  # every cached method: the cached groups computed only at its NFC's steps
        counts = {len(groups.get(g, [])) for g in rel_cached}
        if name != "full" and not name.startswith("diffusers First-Block") and len(counts) != 1:
            problems.append(f"{name} (cached groups computed at different counts of steps: {counts})")
    if problems:
        raise SystemExit(f"--check-modules: not like for like: {problems}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in float32: rehearse the run")
    parser.add_argument("--cpu", action="store_true",
                        help="a FLUX-like model sized for a CPU (2+4 blocks, hidden 384, 576+64 tokens), float32")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; smoke 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the method names")
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                        help="also time each method under torch.compile(mode=MODE), e.g. default reduce-overhead")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--check-modules", action="store_true",
                        help="time nothing: run one generation of each method and print at which steps each cached "
                             "module group really computed; fails unless each diffusers TaylorSeer row computes "
                             "the same modules at the same steps as relcache's TaylorSeer on diffusers' steps")
    parser.add_argument("--no-count-flops", action="store_true",
                        help="enable relcache with count_flops=False (its first call then runs without torch's FLOP "
                             "counter; the timed generations are the same either way)")
    args = parser.parse_args()
    # a primed call starts a generation it does not finish, on purpose: not worth a warning each
    warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
    if args.smoke and args.cpu:
        parser.error("--smoke and --cpu are two sizes: give one")
    device = "cpu" if args.smoke or args.cpu else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    steps = args.steps or (8 if args.smoke else 28)
    image_tokens, text_tokens = (16, 8) if args.smoke else (576, 64) if args.cpu else (4096, 512)
    if steps < 4 or args.repeats < 1:
        parser.error("--steps must be >= 4 and --repeats >= 1")
    table = methods(steps, count_flops=not args.no_count_flops, dtype=dtype)
    chosen = args.methods or list(table)
    unknown = [m for m in chosen if m not in table]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {list(table)}")
    if "full" not in chosen:
        chosen = ["full", *chosen]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.touch()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flux_speed.py needs a CUDA GPU (or --smoke, or --cpu)")

    model = build(TINY if args.smoke else CPU if args.cpu else FULL, device, dtype)
    fixed = inputs(model, image_tokens, text_tokens, device, dtype)
    probe = _AttentionRuns(model)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()} torch {torch.__version__} "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; FLUX "
          f"{model.config.num_layers}+{model.config.num_single_layers} blocks, {image_tokens}+{text_tokens} tokens, "
          f"{steps} steps, {dtype}", flush=True)
    for ratio, (n, k, sched) in plan(steps).items():  # every method of a row at the same NFC
        peer_line = (f"diffusers' TaylorSeer and relcache's TaylorSeer on its steps: interval {sched[0]}, warm-up "
                     f"{sched[1]}" if sched else "no diffusers TaylorSeer schedule has this NFC")
        print(f"{ratio}x: NFC {k} of {steps} for every method (FORA and TaylorSeer interval {n}, RFC target_nfc {k}; "
              f"{peer_line})", flush=True)
    if args.check_modules:
        check_modules(model, {m: table[m] for m in chosen}, fixed, image_tokens, steps, device, dtype)
        return
    rows: list[dict[str, Any]] = []
    for mode in [None, *args.compile]:
        times: dict[str, list[float]] = {m: [] for m in chosen}
        info: dict[str, dict[str, Any]] = {}

        def timed(name: str, run: Any, times: dict[str, list[float]] = times,
                  info: dict[str, dict[str, Any]] = info) -> None:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            probe.reset()
            start = time.perf_counter()
            generate(run, fixed, image_tokens, steps, device, dtype)
            times[name].append(time.perf_counter() - start)
            stats = relcache.stats(model) if relcache.is_enabled(model) else None
            info[name] = dict(nfc=probe.count,
                              peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
                              cache_gib=(stats.cache_bytes / 2**30) if stats else 0.0)
            print(f"  {name}: {times[name][-1]:.2f} s, NFC {probe.count}", flush=True)

        def save(times: dict[str, list[float]] = times, info: dict[str, dict[str, Any]] = info,
                 mode: str | None = mode, before: tuple[dict[str, Any], ...] = tuple(rows)) -> None:
            if args.out is not None:  # after every round: an interrupted run keeps what finished
                args.out.write_text(json.dumps([*before, *table_rows(mode, times, info, steps)], indent=1))

        if mode is None:  # eager: the plain model warms the GPU with one untimed generation; then every round
            # enables each method afresh and primes it with one untimed call (relcache measures FLOPs at an enable's
            # first call, under torch's FLOP counter: kept out of the timing), then times one generation
            generate(model, fixed, image_tokens, steps, device, dtype)
            for _ in range(args.repeats):
                for name in list(chosen):
                    attach, detach = table[name]
                    attach(model)
                    try:
                        prime(model, fixed, image_tokens, steps, device, dtype)
                        timed(name, model)
                    except torch.OutOfMemoryError as err:  # left out of later rounds: the other methods still run
                        print(f"{name}: out of memory, left out of later rounds ({str(err)[:160]})", flush=True)
                        chosen.remove(name)
                    finally:
                        detach(model)
                        # what a peer's hooks keep in reference cycles (relcache's disable frees its own at once);
                        # no empty_cache: the next method would pay the driver's allocations inside its timing
                        gc.collect()
                save()
        else:  # compiled: each method afresh (an enable makes new hooks, which compiled code guards on), its repeats
            # back to back, not interleaved (the module docstring says why)
            for name in chosen:
                torch._dynamo.reset()
                attach, detach = table[name]
                attach(model)
                try:
                    run = torch.compile(model, mode=mode)
                    generate(run, fixed, image_tokens, steps, device, dtype)  # compiles every kind of step
                    for _ in range(args.repeats):
                        timed(name, run)
                finally:
                    detach(model)
                    gc.collect()
                save()
            torch._dynamo.reset()
        done = table_rows(mode, times, info, steps)
        rows += done
        label = "eager" if mode is None else f"compiled ({mode})"
        print(f"\n{label}: full generation {done[0]['time_s']:.2f} s" if done and done[0]["method"] == "full"
              else f"\n{label}: the plain model was not timed")
        print("| method | NFC | time s | speed-up | ideal | % of ideal | peak GiB |")
        print("|---|---|---|---|---|---|---|")
        for row in done:
            print(f"| {row['method']} | {row['nfc']} | {row['time_s']:.2f} | {row['speedup']:.2f}x | "
                  f"{row['ideal']:.2f}x | {row['pct_of_ideal']:.1f} | {row['peak_gib']:.1f} |", flush=True)
        save()


if __name__ == "__main__":
    main()
