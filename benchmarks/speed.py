"""Speed of caching on DiT architectures (random weights): a benchmark, not a test.

For each model size (DiT-S/2, DiT-B/2, DiT-XL/2 at 256x256, i.e. 32x32x4 latents; batch 2 = one image with
CFG batched) it times full computation and every method at each budget in one run, interleaved per
repeat, and reports:

* speed-up against full computation and its ratio to the ideal T/NFC;
* the cost of one cached step as a fraction of a full step, derived from the same run:
  ``(t_method - NFC * t_full_step) / (T - NFC) / t_full_step``;
* the memory held by the caches at the end of a generation (``relcache.stats(...).cache_bytes``: every tensor
  the predictors and the RCS schedule keep);
* under each table, every method's time over TaylorSeer's round by round (median and range over the rounds): on a
  machine whose speed drifts, a steadier comparison than two medians. Each row's per-round times are saved too.

Each method is enabled, primed with one untimed step (relcache's one-off FLOP measurement), then timed.
The "every step full" row runs relcache with nothing cached: what its runtime alone costs or saves.

Examples::

    python benchmarks/speed.py                         # DiT-S/2 and DiT-B/2, NFC 14 and 7
    python benchmarks/speed.py --models B --repeats 3  # quick subset
    python benchmarks/speed.py --models XL --dtype bfloat16 --device cuda
    python benchmarks/speed.py --models S --budgets 14 --compile default   # adds torch.compile (inductor) rows

With ``--compile MODE`` the same run also times, after the eager rows, the plain model and every method under
``torch.compile(model, mode=MODE)``: each method on its own copy of the model, compiled once and warmed with one
untimed generation (which compiles every kind of step), then all timed in turn, ``--repeats`` rounds, interleaved
like the eager rows; compiled speed-ups are against the compiled plain model (``--compiled-only``: no eager rows
first; the compiled table is printed and saved before the breakdown). ``--breakdown`` then times every call
of one more generation of each: what the first call (it records into empty caches and, with batch modulation,
tabulates the generation's adaLN projections), the later full calls and the cached calls cost against a plain
compiled step, which the derived column above lumps together.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from torch._dynamo.utils import counters

import relcache
from relcache import FORA, RFC, CacheConfig, InputError, Interval, Relational, RFCPlus, Taylor, TaylorSeer
from relcache.evaluation.bench import interval_for

SIZES = {  # (depth, hidden, heads) of the DiT paper's configurations, patch 2; "T" is a smoke-test size
    "T": (2, 64, 2),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "XL": (28, 1152, 16),
}
INTERVAL_FOR_NFC = {14: 4, 11: 5, 10: 6, 8: 7, 7: 9}


def machine_line(threads: int) -> str:
    """The head of a benchmark's output: UTC time, host, CPU model, torch release and threads."""
    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if info.exists() else platform.processor()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {platform.node()} {cpu}, torch {torch.__version__}, "
            f"{threads} threads")


def build(size: str, dtype: torch.dtype, device: str) -> DiTTransformer2DModel:
    depth, hidden, heads = SIZES[size]
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                  out_channels=8, num_layers=depth, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000)
    # like diffusers' converted DiT checkpoints: every block holds a copy of the original DiT's one
    # timestep-and-class embedder (relcache computes the copies once per call; see relcache.runtime.shared)
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model.to(device=device, dtype=dtype).eval()


def methods(budget: int, cache_dtype: torch.dtype | None, steps: int = 50) -> dict[str, relcache.CacheConfig]:
    """Every method of ``budget`` (NFC of 50 steps, naming its interval) at one NFC over ``steps``: the interval
    methods keep the budget's interval and the target-NFC methods aim at that interval's NFC over ``steps``
    (``relcache.evaluation.bench.interval_for``, as ``relcache bench`` does), so a budget's paired lines compare
    methods that spend the same number of full steps."""
    n, nfc = interval_for(budget, steps)
    configs = {
        "every step full": FORA(1, 1),  # caching nothing: what relcache's runtime alone costs or saves
        "FORA": FORA(n),
        "TaylorSeer m=2": TaylorSeer(n, 2),
        "RFE alone m=2": CacheConfig(Relational(2), Interval(n, 2)),
        "RCS alone m=2": CacheConfig(Taylor(2), InputError(target_nfc=nfc)),
        "RFC m=2": RFC(order=2, target_nfc=nfc),
        # issue 19's pair: calibrated steps are fixed in advance; FORA's full steps stand in for them (the same count,
        # so the same model FLOPs and the same number of cached steps)
        "RFC+ fit m=2 (fixed steps)": RFCPlus(order=2, fit=True, full_steps=FORA(n).schedule.full_steps(steps)),
    }
    if cache_dtype is not None:  # (a predictor that keeps its caches as computed, RFC+ fit's, is left out)
        configs = {k: dataclasses.replace(c, cache_dtype=cache_dtype) for k, c in configs.items()
                   if not c.predictor.computed_only}
    return configs


def class_labels(images: int, device: str) -> torch.Tensor:
    """Class 207 for each image, then the null class 1000 for its unconditional half (CFG batched)."""
    return torch.tensor([207] * images + [1000] * images, device=device)


def generate(model: DiTTransformer2DModel, steps: int, device: str, dtype: torch.dtype, images: int = 1,
             log: list[float] | None = None,
             around: Callable[[int], contextlib.AbstractContextManager | None] | None = None,
             latent: int = 32) -> torch.Tensor:
    """One DDIM generation of ``images`` images with CFG batched (batch ``2 * images``), like DiTPipeline's loop.
    ``log``: each transformer call's wall time is appended (on a GPU after a synchronisation, which costs a little);
    ``around(i)``: a context entered around call ``i`` (e.g. a profiler), or None for none; ``latent``: the latents'
    height and width (32: a 256x256 image)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(steps)
    relcache.begin_generation(model, timesteps=scheduler.timesteps)  # announced: batch_modulation may tabulate
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 4, latent, latent, generator=g).to(device=device, dtype=dtype)
    labels = class_labels(images, device)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if log is not None and device == "cuda":
                torch.cuda.synchronize()  # the call alone, not the scheduler's step before it
            start = time.perf_counter()
            with (around(i) if around is not None else None) or contextlib.nullcontext():
                eps = model(torch.cat([x, x]), timestep=t.expand(2 * images).to(device),
                            class_labels=labels).sample[:, :4]
            if log is not None:
                if device == "cuda":
                    torch.cuda.synchronize()
                log.append(time.perf_counter() - start)
            cond, uncond = eps.chunk(2)
            x = scheduler.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample
    if device == "cuda":
        torch.cuda.synchronize()
    return x


def prime(model: DiTTransformer2DModel, steps: int, device: str, dtype: torch.dtype, images: int = 1) -> None:
    """One untimed full step right after ``relcache.enable``: relcache measures FLOPs with
    torch.utils.flop_counter on the first step of each input shape, once per enable, which a serving process
    pays once; it would otherwise land in every timed generation here."""
    relcache.begin_generation(model, steps)
    x = torch.zeros(2 * images, 4, 32, 32, device=device, dtype=dtype)
    labels = class_labels(images, device)
    with torch.no_grad():
        model(x, timestep=torch.full((2 * images,), 999, device=device), class_labels=labels)


def timed(model: DiTTransformer2DModel, steps: int, device: str, dtype: torch.dtype, images: int = 1) -> float:
    """Wall time of one generation."""
    start = time.perf_counter()
    generate(model, steps, device, dtype, images)
    return time.perf_counter() - start


@dataclasses.dataclass
class Breakdown:
    """One more generation of a compiled model, each call timed (``--breakdown``): where its time goes."""

    calls: list[float]  # seconds per transformer call
    full_steps: list[int]  # relcache's full steps (every step for the plain model)

    def ms(self, steps: list[int]) -> float:
        """The median of the calls ``steps`` in ms (NaN for none)."""
        return 1e3 * statistics.median([self.calls[i] for i in steps]) if steps else float("nan")

    @property
    def first_ms(self) -> float:
        return 1e3 * self.calls[0]

    @property
    def full_ms(self) -> float:
        """The median full call after the first."""
        return self.ms([i for i in self.full_steps if i > 0])

    @property
    def cached_ms(self) -> float:
        full = set(self.full_steps)
        return self.ms([i for i in range(len(self.calls)) if i not in full])

    def row(self, plain_ms: float) -> dict[str, object]:
        """The three calls' ms; the first and the full calls' excess over ``plain_ms`` (a plain compiled step) and
        a cached call as a share of it, in %; and the raw per-call times and full steps."""
        return {"first_ms": self.first_ms, "full_ms": self.full_ms, "cached_ms": self.cached_ms,
                "first_over_plain_pct": 100 * (self.first_ms / plain_ms - 1),
                "full_over_plain_pct": 100 * (self.full_ms / plain_ms - 1),
                "cached_of_plain_pct": 100 * self.cached_ms / plain_ms,
                "plain_ms": plain_ms, "calls_ms": [1e3 * c for c in self.calls], "full_steps": list(self.full_steps)}


def compiled_times(model: DiTTransformer2DModel, configs: dict[object, relcache.CacheConfig], mode: str,
                   args: argparse.Namespace, dtype: torch.dtype,
                   timed_all: Callable[[dict[object, list[float]], dict[object, int]], None] = lambda t, n: None,
                   ) -> tuple[dict[object, list[float]], dict[object, int], dict[object, Breakdown]]:
    """Times of the compiled plain model (key "full") and of each config under ``torch.compile(model, mode=mode)``,
    interleaved: each config gets its own copy of the model (same weights), enabled and compiled once (each enabled
    model compiles under its own entry frame, so none shares another's recompile limit) and warmed with one untimed
    generation; then every repeat times each compiled model once, in turn, so that a change in the machine's speed
    during the run falls on all of them alike. ``timed_all(times, nfc)`` runs once every repeat is timed, before the
    breakdown (which a time limit may cut)."""
    torch._dynamo.reset()
    compiled: dict[object, torch.nn.Module] = {}
    copies: dict[object, DiTTransformer2DModel] = {}
    try:
        for key, cfg in [("full", None), *configs.items()]:
            own = copies[key] = model if cfg is None else copy.deepcopy(model)  # same weights, its own
            if cfg is not None:
                relcache.enable(own, cfg, batch_modulation=str(key[1]).endswith(" + batch modulation"))
            compiled[key] = torch.compile(own, mode=mode)
            generate(compiled[key], args.steps, args.device, dtype, args.images)  # compiles every kind of step
        times: dict[object, list[float]] = {key: [] for key in compiled}
        for _ in range(args.repeats):
            for key, fn in compiled.items():
                times[key].append(timed(fn, args.steps, args.device, dtype, args.images))
        nfc = {key: relcache.stats(copies[key]).nfc for key in configs}
        timed_all(times, nfc)
        breakdown: dict[object, Breakdown] = {}
        if args.breakdown:
            for key, fn in compiled.items():
                calls: list[float] = []
                generate(fn, args.steps, args.device, dtype, args.images, log=calls)
                steps = list(range(args.steps)) if key == "full" else relcache.stats(copies[key]).full_steps
                breakdown[key] = Breakdown(calls, steps)
    finally:
        for key, own in copies.items():
            if key != "full":
                relcache.disable(own)
        torch._dynamo.reset()
    return times, nfc, breakdown


def timing_row(size: str, args: argparse.Namespace, budget: int, name: str, t: float, k: int, t_full: float,
               **extra: object) -> dict[str, object]:
    """One method's row, eager or compiled: its median time ``t`` and NFC ``k`` against the plain model's ``t_full``
    (the cached step's share derived as the module docstring says), plus ``extra`` columns."""
    step = t_full / args.steps
    cached_frac = (t - k * step) / (args.steps - k) / step if k < args.steps else float("nan")
    return {"model": f"DiT-{size}/2", "batch": 2 * args.images, "method": name, "budget": budget, "nfc": k,
            "time_s": t, "full_time_s": t_full, "speedup": t_full / t, "ideal": args.steps / k,
            "pct_of_ideal": 100 * (t_full / t) / (args.steps / k), "cached_step_fraction": cached_frac, **extra}


PAIRED_WITH = "TaylorSeer m=2"  # the method each row is also compared with round by round (the speed issue's 3 %)


def paired_lines(rows: list[dict[str, object]], versus: str = PAIRED_WITH) -> list[str]:
    """For each row with per-round times, its time over ``versus``'s in the same round (same budget, same batch
    modulation), as the median and range over the rounds. Rounds are timed one right after the other, so a drift
    of the machine's speed cancels out of each ratio; the medians of the table's columns do not pair rounds."""
    lines = []
    for row in rows:
        name = str(row["method"])
        suffix = " + batch modulation" if name.endswith(" + batch modulation") else ""
        ref = next((r for r in rows if r["method"] == versus + suffix and r["budget"] == row["budget"]), None)
        if ref is None or ref is row or not row.get("times_s") or len(row["times_s"]) != len(ref.get("times_s", ())):
            continue
        ratios = sorted(a / b for a, b in zip(row["times_s"], ref["times_s"], strict=True))
        row[f"over_{versus}{suffix}_per_round"] = ratios  # the key names the row it was timed against
        lines.append(f"{name} over {versus}{suffix}, NFC {row['nfc']}, per round: median "
                     f"{100 * (statistics.median(ratios) - 1):+.1f} %, range {100 * (ratios[0] - 1):+.1f} % to "
                     f"{100 * (ratios[-1] - 1):+.1f} % ({len(ratios)} rounds)")
    return lines


def row_cells(row: dict[str, object], steps: int) -> str:
    """The printed cells every table shares: method, NFC, time, speed-up, ideal, % of ideal, cached step's share."""
    frac = "-" if row["nfc"] == steps else f"{100 * row['cached_step_fraction']:.1f} %"
    return (f"| {row['method']} | {row['nfc']} | {row['time_s']:.2f} | {row['speedup']:.2f}x | {row['ideal']:.2f}x | "
            f"{row['pct_of_ideal']:.1f} | {frac} |")


def table_head(title: str, t_full: float, steps: int, extra: tuple[str, ...] = ()) -> None:
    """Print a table's title (the plain model's generation and step time) and its header, ``extra`` columns last."""
    print(f"\n{title}: full generation {t_full:.2f} s ({t_full / steps * 1e3:.1f} ms/step)")
    cols = ("method", "NFC", "time s", "speed-up", "ideal", "% of ideal", "cached step / full step", *extra)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def compiled_rows(model: DiTTransformer2DModel, size: str, configs: dict[object, relcache.CacheConfig],
                  args: argparse.Namespace, dtype: torch.dtype,
                  save: Callable[[list[dict[str, object]]], None] = lambda rows: None) -> list[dict[str, object]]:
    """The compiled table: every method against the compiled plain model, printed and returned as rows, with dynamo's
    and inductor's counts over the whole table (graphs, graph breaks, graphs CUDA graphs skipped). The table is
    printed and ``save``d as soon as the repeats are timed; ``--breakdown`` adds its columns after."""
    counters.clear()
    rows: list[dict[str, object]] = []

    def table(times: dict[object, list[float]], nfc: dict[object, int]) -> None:
        counts = {"graphs": counters["stats"]["unique_graphs"],
                  "graph_breaks": sum(counters["graph_break"].values()),
                  "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
        t_full = statistics.median(times["full"])
        table_head(f"DiT-{size}/2 compiled (mode={args.compile})", t_full, args.steps)
        for (budget, name) in configs:
            row = timing_row(size, args, budget, name, statistics.median(times[(budget, name)]),
                             nfc[(budget, name)], t_full, compile=args.compile, compile_counts=counts,
                             times_s=times[(budget, name)])
            rows.append(row)
            print(row_cells(row, args.steps))
        for line in paired_lines(rows):
            print(line)
        print(f"dynamo over this table (every model): {counts['graphs']} graphs, {counts['graph_breaks']} graph "
              f"breaks; inductor: {counts['cudagraph_skips']} graphs not captured in CUDA graphs "
              "(TORCH_LOGS=cudagraphs says why)", flush=True)
        save(rows)

    _, _, breakdown = compiled_times(model, configs, args.compile, args, dtype, table)
    if breakdown:
        plain_ms = breakdown["full"].ms(list(range(args.steps)))
        print(f"\nOne more generation each, every call timed: plain compiled step {plain_ms:.1f} ms (median)")
        print("| method | first call ms | later full calls ms | cached calls ms | first call over a plain step | "
              "full calls over a plain step | cached call / plain step |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            b = breakdown[(row["budget"], row["method"])].row(plain_ms)
            row["breakdown"] = b
            cached = "-" if row["nfc"] == args.steps else f"{b['cached_ms']:.1f}"
            share = "-" if row["nfc"] == args.steps else f"{b['cached_of_plain_pct']:.1f} %"
            print(f"| {row['method']} | {b['first_ms']:.0f} | {b['full_ms']:.1f} | {cached} | "
                  f"{b['first_over_plain_pct']:+.0f} % | {b['full_over_plain_pct']:+.1f} % | {share} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["S", "B"], choices=list(SIZES))
    parser.add_argument("--budgets", nargs="+", type=int, default=[14, 7], choices=list(INTERVAL_FOR_NFC),
                        help="NFC of 50 steps, naming the interval (14: 4, 11: 5, 10: 6, 8: 7, 7: 9); over other "
                             "--steps every method of a budget runs that interval's NFC (printed), and a budget "
                             "whose NFC an earlier one took is left out")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the median is reported")
    parser.add_argument("--methods", nargs="+", help="subset of method names")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache-dtype", default=None, choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=1, help="images per generation (batch 2 x images with CFG)")
    parser.add_argument("--compile", metavar="MODE",
                        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
                        help="also time every method under torch.compile(model, mode=MODE), in the same run")
    parser.add_argument("--batch-modulation", action="store_true",
                        help="also time every method with enable(..., batch_modulation=True), in the same run")
    parser.add_argument("--breakdown", action="store_true",
                        help="with --compile: one more generation of each compiled model with every call timed: the "
                             "first call, later full calls and cached calls against a plain compiled step")
    parser.add_argument("--compiled-only", action="store_true",
                        help="with --compile: time only the compiled models (no eager table first)")
    parser.add_argument("--out", default="runs/speed.json")
    args = parser.parse_args()
    # partial generations on purpose (a primed step, the first steps of a generation): not worth a warning each
    warnings.filterwarnings("ignore", "relcache: a generation announced", RuntimeWarning)
    if (args.breakdown or args.compiled_only) and not args.compile:
        parser.error("--breakdown and --compiled-only time the compiled models: they need --compile MODE")
    budgets: list[int] = []  # every method of a budget at one NFC over --steps (interval_for)
    for b in args.budgets:
        n, k = interval_for(b, args.steps)
        if k in [interval_for(c, args.steps)[1] for c in budgets]:
            print(f"budget {b}: NFC {k} over {args.steps} steps, which an earlier budget already runs: left out")
            continue
        budgets.append(b)
        print(f"budget {b}: every method at NFC {k} of {args.steps} steps (interval {n}; RCS and RFC target_nfc {k})")
    args.budgets = budgets
    dtype = getattr(torch, args.dtype)
    cache_dtype = getattr(torch, args.cache_dtype) if args.cache_dtype else None

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(), "gpu": gpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
            "dtype": args.dtype, "cache_dtype": args.cache_dtype, "steps": args.steps, "repeats": args.repeats,
            "compile": args.compile}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []

    def save(more: list[dict[str, object]] = ()) -> None:  # after every table: a run cut short keeps what finished
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": [*rows, *more]}, indent=2))

    for size in args.models:
        model = build(size, dtype, args.device)
        generate(model, 3, args.device, dtype, args.images)  # warm-up
        configs = {(b, name): cfg for b in args.budgets for name, cfg in methods(b, cache_dtype, args.steps).items()
                   if (not args.methods or name in args.methods)
                   and (name != "every step full" or b == args.budgets[0])}  # the same for every budget
        if args.batch_modulation:  # each method again, every step's adaLN projections computed up front
            configs.update({(b, f"{name} + batch modulation"): cfg for (b, name), cfg in list(configs.items())})
        if args.compiled_only:
            rows += compiled_rows(model, size, configs, args, dtype, save)
            save()
            continue
        times: dict[object, list[float]] = {"full": []}
        memory: dict[object, int] = {}
        nfc: dict[object, int] = {}
        for _ in range(args.repeats):
            times["full"].append(timed(model, args.steps, args.device, dtype, args.images))
            for key, cfg in configs.items():
                relcache.enable(model, cfg, batch_modulation=key[1].endswith(" + batch modulation"))
                try:
                    prime(model, args.steps, args.device, dtype, args.images)
                    times.setdefault(key, []).append(timed(model, args.steps, args.device, dtype, args.images))
                    st = relcache.stats(model)
                    memory[key], nfc[key] = st.cache_bytes, st.nfc
                finally:
                    relcache.disable(model)
        t_full = statistics.median(times["full"])
        table_head(f"DiT-{size}/2 {args.dtype} on {args.device}, batch {2 * args.images}", t_full, args.steps,
                   ("cache MiB",))
        for (budget, name) in configs:
            row = timing_row(size, args, budget, name, statistics.median(times[(budget, name)]),
                             nfc[(budget, name)], t_full, cache_mib=memory[(budget, name)] / 2**20,
                             times_s=times[(budget, name)])
            rows.append(row)
            print(f"{row_cells(row, args.steps)} {row['cache_mib']:.1f} |")
        for line in paired_lines(rows[-len(configs):]):
            print(line)
        save()
        if args.compile:
            rows += compiled_rows(model, size, configs, args, dtype, save)
            save()
    save()
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
