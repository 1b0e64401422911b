#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go, at most 6 minutes on one H200: FLUX.1-dev-shaped (random
# weights, bfloat16, 1024x1024, 28 steps) against diffusers' own caches, then DiT-XL/2 (bfloat16) speed, eager, compiled
# and under CUDA graphs, host syncs and one cached step's cost and launches. Each command has its own time limit and
# writes its output as it goes, most important first, so an over-long step costs only itself.
# Usage: benchmarks/gpu.sh [--smoke] [OUTDIR]   (needs a CUDA GPU and relcache installed or on PYTHONPATH)
# --smoke rehearses every command on the CPU at tiny sizes (same code paths, float32), so that the GPU run works
# the first time, but syncs.py (it counts CUDA host syncs: a GPU only); on 2 cores it takes about 15 minutes, most of
# it compiling.
set -uo pipefail
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out=$(realpath -m "${1:-runs/gpu}")
mkdir -p "$out"
cd "$(dirname "$0")" || exit 1
export PYTHONUNBUFFERED=1
if [ $smoke = 1 ]; then
  size=(--models T); dt=(--dtype float32); speed=(--steps 20 --budgets 7 --repeats 1 --device cpu); rep=1
  flux=(--smoke --repeats 1); scale=20  # the CPU compiles slowly: every limit times 20
  offload=(--device cpu --offload-tokens 16+8 --offload-blocks 1 --rounds 1)
else
  size=(--models XL); dt=(--dtype bfloat16); speed=(--budgets 14 --repeats 2 --device cuda); rep=3
  flux=(--repeats 1); scale=1
  offload=(--device cuda --offload-tokens 4096+512 --offload-blocks 2 --rounds 5)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
fi
# Stop at once, not after every command failed the same way, when the Python here cannot run them.
check="import torch, diffusers, relcache
print('torch', torch.__version__, 'diffusers', diffusers.__version__)
if $smoke == 0 and not torch.cuda.is_available(): raise SystemExit('no CUDA device: run with --smoke to rehearse')"
if ! python3 -c "$check" 2>&1 | tee -a "$out/gpu.txt"; then
  echo "== stopped: the check above failed (torch, diffusers and relcache are needed; CUDA unless --smoke)" \
    | tee -a "$out/gpu.txt"
  exit 2
fi
date -u | tee -a "$out/gpu.txt"

# run NAME SECONDS CMD...: CMD under a time limit (times $scale), its output in $out/NAME.txt. The limits add up to
# more than 6 minutes; the script's own budget (GPU_BUDGET, default 360 s, times $scale) cuts the last ones short, so
# the whole run never takes longer, and a command the budget no longer reaches is skipped (said in gpu.txt).
budget=$((${GPU_BUDGET:-360} * scale))
incomplete=0  # commands that failed, were cut or were skipped: the script then exits 1
run() {
  local name=$1 limit=$(($2 * scale)) start=$SECONDS left=$((budget - SECONDS)) rc
  shift 2
  if [ $left -le 5 ]; then
    echo "== $name: skipped, the ${budget} s budget is spent" | tee -a "$out/gpu.txt"
    incomplete=$((incomplete + 1))
    return
  fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > >(tee "$out/$name.txt") 2>&1
  rc=$?
  [ $rc -ne 0 ] && incomplete=$((incomplete + 1))
  echo "== $name: exit $rc, $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
}

# The order is by importance and the limits come from the H200 runs of 2026-12-04 (benchmarks/results/
# gpu-h200-2026-12-04): what the 360 s budget does not reach is skipped, said in gpu.txt. Every command prints and
# saves each table as soon as it is measured, so a command cut by its limit still leaves what it finished.
# 1. FLUX.1-dev-shaped, eager: relcache's FORA, TaylorSeer and RFC at NFC 8 and 4 of 28 (every method of a row at one
# NFC), diffusers' TaylorSeer on relcache's modules at that NFC beside relcache's TaylorSeer on diffusers' steps, and
# diffusers' First-Block caches. One round: 14 generations (one a warm-up) and 13 primed calls (a FLUX generation is
# estimated at 3-5 s on an H200; none was timed yet). --smoke has one row (NFC 2 of 8): 9 generations.
run flux_eager 120 python3 flux_speed.py "${flux[@]}" --out "$out/flux_eager.json"
# 2. DiT-XL/2 at batch 16 (8 images, CFG batched; --smoke: --steps 20, where speed.py runs every method of budget 7 at
# its interval's NFC, 4 of 20), eager, then compiled (inductor) without the eager table again, then
# under CUDA graphs (torch.compile mode "reduce-overhead"; on the CPU, --smoke, inductor skips the graphs): caches
# held in place at stable addresses (docs/spec.md, "Capture"). Compiling three DiT-XL/2 models takes most of a
# compiled command's limit (inductor's cache on disk shortens the second). Each compiled table gives dynamo's graphs
# and breaks and the graphs CUDA graphs skipped; --breakdown then times each call of one more generation.
run speed_b16 40 python3 speed.py "${size[@]}" "${dt[@]}" "${speed[@]}" --images 8 --methods FORA "TaylorSeer m=2" \
  "RFC m=2" --out "$out/speed_b16.json"
run speed_b16_compiled 80 python3 speed.py "${size[@]}" "${dt[@]}" "${speed[@]}" --images 8 --methods FORA \
  "RFC m=2" --compile default --compiled-only --out "$out/speed_b16_compiled.json"
run speed_b16_cudagraphs 90 python3 speed.py "${size[@]}" "${dt[@]}" "${speed[@]}" --images 8 --methods FORA \
  "RFC m=2" --compile reduce-overhead --compiled-only --breakdown --out "$out/speed_b16_cudagraphs.json"
# 3. DiT-XL/2: host syncs per generation (CUDA only), then one cached step's time and kernel launches at batch 2.
# (No --profile here: torch.profiler with CUDA activity did not finish one DiT-XL/2 generation in 55 s there.)
[ $smoke = 1 ] || run syncs 35 python3 syncs.py "${size[@]}" "${dt[@]}"
run cached_step 45 python3 cached_step.py "${size[@]}" "${dt[@]}" --repeats $rep
# 4. FLUX-shaped, compiled: RFC at NFC 8 against the compiled plain model (compiling FLUX takes most of this).
run flux_compiled 60 python3 flux_speed.py "${flux[@]}" --methods "RFC 3.5x" --compile default \
  --out "$out/flux_compiled.json"
# 5. Offloaded caches (CacheStorage(offload=True)): a cached step's forecasts at FLUX width with caches in pinned host
# memory, prefetched one module ahead, against caches on the GPU (seconds and ratios).
run cache_offload 60 python3 cache_memory.py --parts offload "${offload[@]}" --out "$out/cache_offload.json"
# 6. If time is left: RFE's and RFC's cached step with the fused forecast (relcache.methods.fused, two Triton kernels
# per module instead of eight; opt-in until this measures it), beside the torch path's, at batch 2.
run cached_step_fused 40 python3 cached_step.py "${size[@]}" "${dt[@]}" --repeats $rep --fused --methods \
  "Relational m=2 (RFE alone)" "Relational m=2 + RCS check (RFC)"
echo "== done in $SECONDS s; $incomplete command(s) failed, cut or skipped" | tee -a "$out/gpu.txt"
[ $incomplete -eq 0 ]
