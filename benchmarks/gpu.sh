#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go (DiT-XL/2, bfloat16, random weights), eager and compiled.
# Usage: benchmarks/gpu.sh [--smoke] [OUTDIR]   (needs a CUDA GPU and relcache installed or on PYTHONPATH)
# --smoke rehearses every command on the CPU at a tiny size (DiT "T", float32, 20 steps, one repeat), so that the
# GPU run works the first time; it takes a few minutes on 2 cores.
set -uo pipefail
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out=$(realpath -m "${1:-runs/gpu}")
mkdir -p "$out"
cd "$(dirname "$0")" || exit 1
export PYTHONUNBUFFERED=1
if [ $smoke = 1 ]; then
  size=(--models T); dt=(--dtype float32); speed=(--steps 20 --budgets 7 --repeats 1 --device cpu); rep=1
else
  size=(--models XL); dt=(--dtype bfloat16); speed=(--repeats 3); rep=5
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
fi
{ python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  date -u; } 2>&1 | tee -a "$out/gpu.txt"
# host syncs are counted by CUDA's sync debug mode: nothing to count on the CPU
[ $smoke = 1 ] || python3 syncs.py "${size[@]}" "${dt[@]}" 2>&1 | tee "$out/syncs.txt"
python3 cached_step.py "${size[@]}" "${dt[@]}" --repeats $rep --profile 2>&1 | tee "$out/cached_step.txt"
python3 cached_step.py "${size[@]}" "${dt[@]}" --repeats 1 --profile "Relational m=2 (RFE alone)" 2>&1 \
  | tee "$out/cached_step_rfe.txt"
python3 speed.py "${size[@]}" "${dt[@]}" "${speed[@]}" --out "$out/speed_b2.json" 2>&1 | tee "$out/speed_b2.txt"
python3 speed.py "${size[@]}" "${dt[@]}" "${speed[@]}" --images 8 --out "$out/speed_b16.json" 2>&1 \
  | tee "$out/speed_b16.txt"
# compiled (inductor), the three methods that matter, at batch 16: not yet run on a GPU (see docs/performance.md)
python3 speed.py "${size[@]}" "${dt[@]}" "${speed[@]}" --images 8 --methods FORA "TaylorSeer m=2" "RFC m=2" \
  --compile default --out "$out/speed_b16_compiled.json" 2>&1 | tee "$out/speed_b16_compiled.txt"
