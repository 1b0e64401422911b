"""Cache memory at FLUX scale: bytes per block kind, measured, and what they come to on FLUX.1-dev, HunyuanVideo, Wan.

Two measurements, both reading ``relcache.stats(...).peak_module_bytes`` (the caches at their peak):

* ``cpu``: a FLUX-width transformer (diffusers ``FluxTransformer2DModel``, hidden 3072 = 24 heads x 128, 1 double
  and 1 single block, random weights, bfloat16) runs 3 steps, all full (so every history fills to order 2), per
  method and storage, at two token counts (``--tokens``, image + text); the bytes per token per block kind, shown
  linear in the tokens, are extrapolated to FLUX.1-dev at 1024x1024 (19 double + 38 single blocks, 4096 image + 512
  text tokens). Full FLUX width at 4608 tokens is too slow for this shared CPU; widths are the real ones.
* ``meta``: the full-size models (FLUX.1-dev, HunyuanVideo, Wan 2.1 14B, with the shapes of ``SHAPES``) are built
  on PyTorch's meta device, where every operation computes shapes only, and run with relcache enabled: the bytes
  the caches hold are those of the real run, with no computation. Methods whose schedule reads values (RCS) cannot
  run there: RFC's states are measured with its predictor on an ``Interval`` schedule ("RFE alone"), and RCS's
  input history (3 tensors of the first cached module's input) is added.

Also times, as a ratio in one run (interleaved), the forecasts of the cached modules of one double and one single
block at FLUX width for each storage against bfloat16 storage: what a storage adds to a cached step.

    python benchmarks/cache_memory.py --out benchmarks/results/cpu-2026-12-01/cache_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

import relcache
from relcache import CacheStorage, Interval, Relational

F8, BF16 = torch.float8_e4m3fn, torch.bfloat16
STORAGES: dict[str, Any] = {
    "bfloat16 (as computed)": None,
    "bf16 base+input, float8 diffs": CacheStorage(BF16, F8, BF16),
    "float8": CacheStorage(F8, F8, F8),
    "float8, int4 diffs": CacheStorage(F8, "int4", F8),
    "bf16 base+input, int4 diffs": CacheStorage(BF16, "int4", BF16),
    "int8, int4 diffs": CacheStorage("int8", "int4", "int8"),
    "int8 per-channel, int4 diffs": CacheStorage("int8", "int4", "int8", "channel"),
}
#: the storages measured on the meta device by default (``--storages``)
META_STORAGES = ("bfloat16 (as computed)", "float8, int4 diffs")
FLUX_WIDTH = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
GiB = 2**30


def methods(interval: int) -> dict[str, relcache.CacheConfig]:
    """The methods measured; ``interval`` 1 makes every step full (the histories fill in 3 steps)."""
    return {
        "FORA": relcache.FORA(interval, warmup=1),
        "TaylorSeer m=2": relcache.TaylorSeer(interval, 2, warmup=1),
        "RFC m=2 (states: RFE alone)": relcache.CacheConfig(Relational(2), Interval(interval, 1), name="RFE m=2"),
    }


def flux_inputs(model: torch.nn.Module, image: int, text: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    side = int(image**0.5)
    assert side * side == image, "image tokens must be a square"
    ids = torch.stack([torch.zeros(side * side), torch.arange(side).repeat_interleave(side),
                       torch.arange(side).repeat(side)], dim=1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype) if device != "meta" else torch.empty(
            *shape, device="meta", dtype=dtype)

    return dict(hidden_states=rnd(1, image, 64), encoder_hidden_states=rnd(1, text, 4096),
                pooled_projections=rnd(1, 768), timestep=torch.tensor([0.5], device=device, dtype=dtype),
                img_ids=ids.to(device), txt_ids=torch.zeros(text, 3, device=device),
                guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)


def run(model: torch.nn.Module, config: relcache.CacheConfig, kwargs: dict[str, Any], steps: int,
        keep: bool = False) -> relcache.CacheStats:
    """``steps`` calls of one generation with ``config``, each at its own timestep; ``keep`` leaves caching enabled
    (the caller disables). (Before 2026-12-04 every call got the same latents and timestep, which relcache takes for
    further calls of one step since e9bbc1c: three one-step contexts, so FORA and TaylorSeer reported the same
    bytes; found by review. The results committed before e9bbc1c are unaffected.)"""
    relcache.enable(model, config)
    try:
        relcache.begin_generation(model, steps)
        t = kwargs["timestep"]
        with torch.no_grad():
            for i in range(steps):
                model(**(kwargs | {"timestep": t - 0.1 * i / steps}))
        return relcache.stats(model)
    finally:
        if not keep:
            relcache.disable(model)


def first_input_bytes(model: torch.nn.Module) -> int:
    """Bytes of the first cached module's input as computed, from the enabled model's RFE states: one tensor of
    RCS's input history (RCS keeps ``order + 1`` of them)."""
    session = relcache.api._session(model)  # noqa: SLF001 (a benchmark reading the runtime)
    ctx = next(iter(session.contexts.values()))
    record = ctx.caches.records[min(idx for idx, r in ctx.caches.records.items() if r.states)]
    state = record.states[min(record.states)][0]
    shape = state.inp.shape
    return int(torch.Size(shape).numel()) * model.dtype.itemsize


def per_block(stats: relcache.CacheStats) -> dict[str, int]:
    """Peak bytes per block kind (``double``/``single``/``block``), summed over the blocks of that kind."""
    out: dict[str, int] = {}
    for ctx in stats.contexts.values():
        for name, n in ctx.peak_module_bytes.items():
            kind = "single" if name.startswith("single_transformer_blocks") else "double" if name.startswith(
                "transformer_blocks") else "block"
            out[kind] = out.get(kind, 0) + n
    return out


def wanted(method: str, storage: str, cpu: bool = False, storages: tuple[str, ...] = META_STORAGES) -> bool:
    """On the CPU (real computation, slow): every method as computed, and RFC in float8 with int4 differences; on
    the meta device (each run takes minutes of Python on a shared CPU): RFC in ``storages``."""
    if cpu:
        return storage == "bfloat16 (as computed)" or method.startswith("RFC") and storage == "float8, int4 diffs"
    return method.startswith("RFC") and storage in storages


def cpu_measurement(token_counts: list[tuple[int, int]]) -> dict[str, Any]:
    """Real bytes at FLUX width (1 double + 1 single block), bfloat16 on the CPU, at each (image, text) count."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, **FLUX_WIDTH)
    model = model.to_empty(device="cpu").to(BF16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    for name, _ in model.named_buffers():
        raise RuntimeError(f"unexpected buffer {name}")  # to_empty would leave it uninitialised
    rows = []
    for image, text in token_counts:
        kwargs = flux_inputs(model, image, text, "cpu", BF16)
        for mname, cfg in methods(1).items():
            for sname, storage in STORAGES.items():
                if not wanted(mname, sname, cpu=True):
                    continue
                start = time.perf_counter()
                st = run(model, dataclasses.replace(cfg, cache_dtype=storage), kwargs, 3)
                rows.append({"image_tokens": image, "text_tokens": text, "method": mname, "storage": sname,
                             "bytes": per_block(st), "peak_cache_bytes": st.peak_cache_bytes,
                             "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
    return {"rows": rows, "model": model}


def forecast_timing(image: int, text: int, rounds: int) -> dict[str, float]:
    """Median time of the forecasts (RFE m=2, full histories) of the cached modules of one FLUX double and one single
    block at ``image`` + ``text`` tokens, per storage, relative to bfloat16 storage; states recorded from random
    bfloat16 tensors of the modules' shapes (the time does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    d, joint = 3072, image + text
    # (output, input) shapes: double attn (image, text streams), ff, ff_context; single attn, proj_mlp
    shapes = [((1, image, d), (1, image, d)), ((1, text, d), (1, text, d)), ((1, image, d), (1, image, d)),
              ((1, text, d), (1, text, d)), ((1, joint, d), (1, joint, d)), ((1, joint, 4 * d), (1, joint, d))]
    pred, states = Relational(2), {}
    for sname, storage in STORAGES.items():
        states[sname] = []
        for out_shape, in_shape in shapes:
            st = pred.new_state(storage)
            for step in range(3):
                pred.update(st, step, torch.randn(in_shape, generator=g).to(BF16),
                            torch.randn(out_shape, generator=g).to(BF16))
            states[sname].append((st, (st.input(BF16) * 1.01)))
    row = torch.tensor(relcache.methods.history.step_row(2))
    times: dict[str, list[float]] = {k: [] for k in STORAGES}
    with torch.no_grad():
        for _ in range(rounds):
            for sname in STORAGES:  # interleaved: the machine's load hits every storage alike
                start = time.perf_counter()
                for st, inp in states[sname]:
                    pred.forecast(st, inp, row)
                times[sname].append(time.perf_counter() - start)
    base = statistics.median(times["bfloat16 (as computed)"])
    return {k: statistics.median(v) / base for k, v in times.items()}


OFFLOAD_STORAGES: dict[str, Any] = {
    "bfloat16 (as computed)": None,
    "bfloat16, offloaded": CacheStorage(offload=True),
    "int8, int4 diffs": CacheStorage("int8", "int4", "int8"),
    "int8, int4 diffs, offloaded": CacheStorage("int8", "int4", "int8", offload=True),
}


def offload_timing(image: int, text: int, blocks: int, rounds: int, device: str) -> dict[str, Any]:
    """A cached step's forecasts (RFE m=2, full histories) of ``blocks`` FLUX double + single blocks' cached modules
    at ``image`` + ``text`` tokens on ``device``, per storage of ``OFFLOAD_STORAGES``: median seconds (synchronised)
    and the ratio to bfloat16 caches held on the device. Offloaded states are prefetched one module ahead, as the
    runtime does (``PredictorState.prefetch`` before each forecast). States are recorded from random tensors."""
    g = torch.Generator().manual_seed(0)
    d, joint = 3072, image + text
    shapes = [((1, image, d), (1, image, d)), ((1, text, d), (1, text, d)), ((1, image, d), (1, image, d)),
              ((1, text, d), (1, text, d)), ((1, joint, d), (1, joint, d)), ((1, joint, 4 * d), (1, joint, d))]
    pred, row = Relational(2), torch.tensor(relcache.methods.history.step_row(2), device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    states: dict[str, list[tuple[Any, torch.Tensor]]] = {}
    for sname, storage in OFFLOAD_STORAGES.items():
        states[sname] = []
        for _ in range(blocks):
            for out_shape, in_shape in shapes:
                st = pred.new_state(storage)
                for step in range(3):
                    pred.update(st, step, torch.randn(in_shape, generator=g).to(device, BF16),
                                torch.randn(out_shape, generator=g).to(device, BF16))
                states[sname].append((st, st.input(BF16) * 1.01))
    times: dict[str, list[float]] = {k: [] for k in OFFLOAD_STORAGES}
    with torch.no_grad():
        for _ in range(rounds):
            for sname, items in states.items():  # interleaved
                sync()
                start = time.perf_counter()
                for i, (st, inp) in enumerate(items):
                    if i + 1 < len(items):
                        items[i + 1][0].prefetch()
                    pred.forecast(st, inp, row)
                sync()
                times[sname].append(time.perf_counter() - start)
    base = statistics.median(times["bfloat16 (as computed)"])
    device_bytes = {k: sum(st.nbytes for st, _ in v) for k, v in states.items()}
    return {"device": device, "image_tokens": image, "text_tokens": text, "blocks": blocks, "rounds": rounds,
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "ratio": {k: statistics.median(v) / base for k, v in times.items()}, "state_bytes": device_bytes}


SHAPES = {
    # name: (builder, inputs, blocks description, split-CFG contexts, model parameters' bytes in bfloat16)
    "FLUX.1-dev 1024x1024": "19 double + 38 single blocks, 4096 image + 512 text tokens, batch 1, no CFG",
    "HunyuanVideo 720p 129 frames": "20 double + 40 single blocks, 33x45x80 = 118,800 video + 256 text tokens, "
                                    "batch 1, guidance-distilled (one context)",
    "Wan 2.1 14B 720p 81 frames": "40 blocks, hidden 5120, 21x45x80 = 75,600 video tokens, 512 text tokens; CFG as "
                                  "two calls (two contexts: x2)",
}


def meta_models() -> dict[str, tuple[torch.nn.Module, dict[str, Any], int]]:
    """Full-size models on the meta device and their inputs; the int is how many call contexts hold caches."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_layers=19, num_single_layers=38, **FLUX_WIDTH).to(BF16)
        hunyuan = HunyuanVideoTransformer3DModel().to(BF16)  # diffusers' defaults are HunyuanVideo's
        wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                    num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                    eps=1e-6).to(BF16)

    def e(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    hy = dict(hidden_states=e(1, 16, 33, 90, 160), timestep=e(1), encoder_hidden_states=e(1, 256, 4096),
              encoder_attention_mask=torch.ones(1, 256, device="meta", dtype=torch.bool),
              pooled_projections=e(1, 768), guidance=e(1), return_dict=False)
    wn = dict(hidden_states=e(1, 16, 21, 90, 160), timestep=e(1), encoder_hidden_states=e(1, 512, 4096),
              return_dict=False)
    return {"FLUX.1-dev 1024x1024": (flux, flux_inputs(flux, 4096, 512, "meta", BF16), 1),
            "HunyuanVideo 720p 129 frames": (hunyuan, hy, 1),
            "Wan 2.1 14B 720p 81 frames": (wan, wn, 2)}


def meta_measurement(storages: tuple[str, ...] = META_STORAGES, only: str | None = None) -> list[dict[str, Any]]:
    """RFC's bytes on the full-size models (those whose name starts with ``only``, if given) in ``storages``."""
    rows = []
    for name, (model, kwargs, contexts) in meta_models().items():
        if only and not name.startswith(only):
            continue
        print(name, flush=True)
        params = sum(p.numel() for p in model.parameters()) * 2
        for mname, cfg in methods(1).items():
            for sname, storage in STORAGES.items():
                if not wanted(mname, sname, storages=storages):
                    continue
                rcs = 0
                try:
                    st = run(model, dataclasses.replace(cfg, cache_dtype=storage), kwargs, 3, keep=True)
                    if mname.startswith("RFC"):  # RCS: 3 tensors of the first cached module's input, as computed
                        rcs = 3 * first_input_bytes(model)
                except Exception as exc:  # noqa: BLE001 (report and go on)
                    rows.append({"model": name, "method": mname, "storage": sname, "error": repr(exc)[:300]})
                    print(rows[-1], flush=True)
                    continue
                finally:
                    if relcache.is_enabled(model):
                        relcache.disable(model)
                rows.append({"model": name, "method": mname, "storage": sname, "contexts": contexts,
                             "cache_bytes": (st.peak_cache_bytes + rcs) * contexts, "rcs_history_bytes": rcs,
                             "by_kind": st.peak_cache_bytes_by_kind, "by_block": per_block(st),
                             "param_bytes": params})
                print({k: v for k, v in rows[-1].items() if k != "by_kind"}, flush=True)
    return rows


def report(result: dict[str, Any]) -> str:
    """The measurements as markdown tables."""
    lines = [f"# Cache memory ({result['meta']['date']}, {result['meta']['machine']}, torch {result['meta']['torch']})",
             "", f"`{result['meta']['command']}`", ""]
    cpu = result.get("cpu", [])
    if cpu:
        lines += ["## FLUX width (hidden 3072, 1 double + 1 single block, bfloat16, CPU): peak bytes per block", "",
                  "| tokens (image+text) | method | storage | double block | single block "
                  "| per token: double, single |",
                  "|---|---|---|---|---|---|"]
        for r in cpu:
            t = r["image_tokens"] + r["text_tokens"]
            b = r["bytes"]
            lines.append(f"| {r['image_tokens']}+{r['text_tokens']} | {r['method']} | {r['storage']} | "
                         f"{b.get('double', 0)} | {b.get('single', 0)} | "
                         f"{b.get('double', 0) / t:.1f}, {b.get('single', 0) / t:.1f} |")
        lines.append("")
        # linearity and extrapolation to FLUX.1-dev (19 double + 38 single, 4096 + 512 tokens)
        lines += ["### Extrapolated to FLUX.1-dev 1024x1024 (19 double + 38 single blocks, 4096 + 512 tokens)", "",
                  "From the two token counts: bytes = a + b * tokens per block kind (a: per-sample scalars), "
                  "evaluated at 4608 tokens.", "", "| method | storage | double x19 GiB | single x38 GiB | total GiB |",
                  "|---|---|---|---|---|"]
        keyed: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in cpu:
            keyed.setdefault((r["method"], r["storage"]), []).append(r)
        for (m, sname), rs in keyed.items():
            if len(rs) < 2:
                continue
            r0, r1 = rs[0], rs[-1]
            t0, t1 = r0["image_tokens"] + r0["text_tokens"], r1["image_tokens"] + r1["text_tokens"]
            ext = {}
            for kind in ("double", "single"):
                slope = (r1["bytes"].get(kind, 0) - r0["bytes"].get(kind, 0)) / (t1 - t0)
                ext[kind] = r0["bytes"].get(kind, 0) + slope * (4608 - t0)
            d, s1 = 19 * ext["double"] / GiB, 38 * ext["single"] / GiB
            lines.append(f"| {m} | {sname} | {d:.2f} | {s1:.2f} | {d + s1:.2f} |")
        lines.append("")
    if "forecast_time_ratio" in result:
        lines += ["## Forecast time per storage (RFE m=2, one double + one single block, 256 + 32 tokens), "
                  "relative to bfloat16 storage, interleaved medians", "", "| storage | time ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in result["forecast_time_ratio"].items()]
        lines.append("")
    off = result.get("offload")
    if off:
        lines += [f"## Offloaded caches: one cached step's forecasts ({off['blocks']} x (double + single block), "
                  f"{off['image_tokens']} + {off['text_tokens']} tokens, RFE m=2, {off['device']}, median of "
                  f"{off['rounds']} interleaved rounds)", "", "| storage | seconds | ratio to bf16 on the device | "
                  "state bytes |", "|---|---|---|---|"]
        lines += [f"| {k} | {off['seconds'][k]:.4f} | {off['ratio'][k]:.2f} | {off['state_bytes'][k]} |"
                  for k in off["seconds"]]
        lines.append("")
    meta = result.get("meta_models", [])
    if meta:
        lines += ["## Full-size models on the meta device (measured stats, no computation)", ""]
        lines += [f"- {k}: {v}" for k, v in SHAPES.items()]
        lines += ["", "| model | method | storage | caches GiB (GB) | model bfloat16 GiB | per block kind GiB |",
                  "|---|---|---|---|---|---|"]
        for r in meta:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['method']} | {r['storage']} | error: {r['error']} | | |")
                continue
            kinds = ", ".join(f"{k} {v * r['contexts'] / GiB:.2f}" for k, v in r["by_block"].items())
            lines.append(f"| {r['model']} | {r['method']} | {r['storage']} | {r['cache_bytes'] / GiB:.2f} "
                         f"({r['cache_bytes'] / 1e9:.2f}) | {r['param_bytes'] / GiB:.1f} | {kinds} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", default=["64+8", "144+16"], help="image+text token counts (cpu)")
    parser.add_argument("--parts", nargs="+", default=["cpu", "timing", "meta"],
                        choices=["cpu", "timing", "meta", "offload"])
    parser.add_argument("--offload-tokens", default="4096+512", help="image+text tokens of the offload timing")
    parser.add_argument("--offload-blocks", type=int, default=2, help="double + single block pairs (offload)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="offload timing")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--storages", nargs="+", default=list(META_STORAGES), choices=list(STORAGES),
                        help="RFC's storages on the meta device")
    parser.add_argument("--meta-model", choices=["FLUX", "HunyuanVideo", "Wan"], help="only this model (meta)")
    parser.add_argument("--out", default="runs/cache_memory.json")
    parser.add_argument("--report", metavar="JSON", help="only print (and write as .md) the tables of a saved run")
    args = parser.parse_args()
    if args.report:
        text = report(json.loads(Path(args.report).read_text()))
        Path(args.report).with_suffix(".md").write_text(text)
        print(text)
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    counts = [tuple(int(v) for v in t.split("+")) for t in args.tokens]
    result: dict[str, Any] = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                                       "processor": platform.processor(), "threads": torch.get_num_threads(),
                                       "torch": torch.__version__, "command": "python benchmarks/cache_memory.py "
                                       f"--tokens {' '.join(args.tokens)} --parts {' '.join(args.parts)}"}}
    if "offload" in args.parts:
        result["meta"]["command"] += (f" --offload-tokens {args.offload_tokens} --offload-blocks "
                                      f"{args.offload_blocks} --rounds {args.rounds} --device {args.device}")
    if "meta" in args.parts:
        quoted = " ".join(f'"{s}"' if " " in s else s for s in args.storages)
        result["meta"]["command"] += f" --storages {quoted}" + (f" --meta-model {args.meta_model}" if args.meta_model
                                                                   else "")
    model = None
    if "cpu" in args.parts:
        got = cpu_measurement(counts)
        result["cpu"], model = got["rows"], got["model"]
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "timing" in args.parts:
        result["forecast_time_ratio"] = forecast_timing(256, 32, args.rounds)
        print(result["forecast_time_ratio"], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    del model
    if "offload" in args.parts:
        image, text = (int(v) for v in args.offload_tokens.split("+"))
        result["offload"] = offload_timing(image, text, args.offload_blocks, args.rounds, args.device)
        print(result["offload"], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "meta" in args.parts:
        result["meta_models"] = meta_measurement(tuple(args.storages), args.meta_model)
    Path(args.out).write_text(json.dumps(result, indent=2))
    Path(args.out).with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
