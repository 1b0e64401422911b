"""Device diagnostics of 2026-12-04 (run 2, see README.md beside): FLUX memory after each block in a first and a second
call, plain, under torch's FLOP counter and with relcache; a DiT-XL/2 generation profiled at batch 32 (did not finish).
Run from the repository root (run.sh beside); ``--smoke`` rehearses it on the CPU."""
import gc
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from torch.utils.flop_counter import FlopCounterMode

import relcache

part = sys.argv[1]
smoke = "--smoke" in sys.argv
dev = "cpu" if smoke else "cuda"
dt = torch.float32 if smoke else torch.bfloat16

def mem():
    return torch.cuda.memory_allocated() / 2**30 if dev == "cuda" else 0.0

def peak():
    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0

def reset():
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

if part == "flux":
    import flux_speed as fs
    shape = fs.TINY if smoke else fs.FULL
    tok = (16, 8) if smoke else (4096, 512)
    m = fs.build(shape, dev, dt)
    fixed = fs.inputs(m, *tok, dev, dt)
    print(f"built: {mem():.1f} GiB", flush=True)
    seen = []
    blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
    names = [f"d{i}" for i in range(len(m.transformer_blocks))]
    names += [f"s{i}" for i in range(len(m.single_transformer_blocks))]
    hooks = [b.register_forward_hook(lambda mod, a, o, n=n: seen.append((n, mem())))
             for b, n in zip(blocks, names, strict=True)]
    results = {}
    x = torch.randn(1, tok[0], 64, device=dev, dtype=dt)

    def call(label, flops_mode=False):
        seen.clear()
        reset()
        t = time.time()
        try:
            with torch.no_grad():
                if flops_mode:
                    with FlopCounterMode(display=False):
                        m(hidden_states=x, timestep=torch.ones(1, device=dev, dtype=dt), return_dict=False, **fixed)
                else:
                    m(hidden_states=x, timestep=torch.ones(1, device=dev, dtype=dt), return_dict=False, **fixed)
            if dev == "cuda":
                torch.cuda.synchronize()
            res = "ok"
        except torch.OutOfMemoryError:
            res = "OOM"
        results[label] = res
        pick = [s for i, s in enumerate(seen) if i in (0, 1, 2, 10, 18, 19, 20, 30, 40, 56) or i == len(seen) - 1]
        print(f"{label}: {res} in {time.time() - t:.1f} s, peak {peak():.1f} GiB, after-block GiB: "
              + " ".join(f"{n}={g:.1f}" for n, g in pick), flush=True)

    call("plain")
    call("plain under torch FlopCounterMode", flops_mode=True)
    for cf in (False, True):
        relcache.enable(m, relcache.FORA(4), count_flops=cf)
        relcache.begin_generation(m, 4)
        call(f"relcache FORA count_flops={cf}, first call")
        if not cf:
            call(f"relcache FORA count_flops={cf}, second call (cached)")
        relcache.disable(m)
        reset()
        print(f"after disable: {mem():.1f} GiB", flush=True)

    for h in hooks:
        h.remove()
    reset()
    flag = [] if results.get("relcache FORA count_flops=True, first call") == "ok" else ["--no-count-flops"]
    print(f"\n== flux_speed.py eager {flag}", flush=True)
    fs.build = lambda *a, **k: m
    sys.argv = ["flux_speed.py", "--repeats", "1", *(["--smoke"] if smoke else []), *flag, "--out", sys.argv[2]]
    fs.main()

elif part == "dit":
    import speed
    from torch.profiler import ProfilerActivity, profile
    m = speed.build("T" if smoke else "XL", dt, dev)
    images = 2 if smoke else 16
    cfgs = speed.methods(14, None)
    for name in ("full", "FORA", "RFC m=2"):
        if name != "full":
            relcache.enable(m, cfgs[name])
            speed.prime(m, 50, dev, dt, images)
        speed.generate(m, 50, dev, dt, images)  # warm
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        t = time.time()
        with profile(activities=acts) as prof:
            speed.generate(m, 50, dev, dt, images)
        wall = time.time() - t
        ev = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ev) if dev == "cuda" else 0
        syncs = {e.key: e.count for e in ev if "Synchronize" in e.key or "Memcpy" in e.key}
        launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
        print(f"\n== {name}: wall {wall:.2f} s (profiled), GPU kernel time {gpu_us / 1e6:.3f} s, launches {launches}, "
              f"sync/copy calls {syncs}", flush=True)
        print(ev.table(sort_by="self_device_time_total" if dev == "cuda" else "self_cpu_time_total", row_limit=14,
                       max_name_column_width=60), flush=True)
        if name != "full":
            relcache.disable(m)

