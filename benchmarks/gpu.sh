#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go (DiT-XL/2, bfloat16, random weights).
# Usage: benchmarks/gpu.sh [OUTDIR]   (needs a CUDA GPU and relcache installed or on PYTHONPATH)
set -uo pipefail
out=$(realpath -m "${1:-runs/gpu}")
mkdir -p "$out"
cd "$(dirname "$0")" || exit 1
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  date -u; } 2>&1 | tee "$out/gpu.txt"
python3 syncs.py --models XL --dtype bfloat16 2>&1 | tee "$out/syncs.txt"
python3 cached_step.py --models XL --dtype bfloat16 --repeats 5 --profile 2>&1 | tee "$out/cached_step.txt"
python3 cached_step.py --models XL --dtype bfloat16 --repeats 1 --profile "Relational m=2 (RFE alone)" 2>&1 \
  | tee "$out/cached_step_rfe.txt"
python3 speed.py --models XL --dtype bfloat16 --repeats 3 --out "$out/speed_b2.json" 2>&1 | tee "$out/speed_b2.txt"
python3 speed.py --models XL --dtype bfloat16 --repeats 3 --images 16 --out "$out/speed_b32.json" 2>&1 \
  | tee "$out/speed_b32.txt"
