#!/usr/bin/env bash
# gpu.sh as the lent GPU machine runs it (the device tool's `run`), in one call: that machine has torch but no diffusers
# and reaches no package index, and at most 8 files come back from $OUT. So this script
#   1. installs diffusers from wheels carried in .wheels/ when the machine has none (made beforehand, on a machine with
#      PyPI:  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels diffusers==0.42.1 \
#             importlib_metadata
#      and pass carry [".wheels"]; .wheels/ is git-ignored), and runs relcache from src/;
#   2. runs gpu.sh under a time limit (GPU_LIMIT seconds, default 430: gpu.sh's own budget is 360 s);
#   3. puts gpu.txt and a tarball of every output into $OUT, also when gpu.sh was cut short.
# Usage (device tool, repository root): bash benchmarks/gpu_device.sh [--smoke]   with timeout_s about 480.
# On a machine with diffusers installed it only runs gpu.sh and packs its outputs; `--smoke` rehearses on the CPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/runs/gpu-device}
work=$(mktemp -d /tmp/gpu-run.XXXX)
mkdir -p "$out"
if python3 -c "import diffusers" 2>/dev/null; then
  export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
else
  shopt -s nullglob
  wheels=("$root"/.wheels/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_device.sh: this python has no diffusers and .wheels/ holds no wheel: see this script's header" \
      | tee "$out/gpu.txt"
    exit 3
  fi
  site=$(mktemp -d /tmp/gpu-site.XXXX)
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
    || { echo "gpu_device.sh: installing ${wheels[*]} failed" | tee "$out/gpu.txt"; exit 3; }
  export PYTHONPATH="$site:$root/src"
fi
timeout "${GPU_LIMIT:-430}" bash "$root/benchmarks/gpu.sh" "$@" "$work"
rc=$?
echo "== gpu_device.sh: gpu.sh exit $rc" >> "$work/gpu.txt"
cp "$work/gpu.txt" "$out/gpu.txt"
tar czf "$out/gpu.tgz" -C "$work" .
echo "gpu_device.sh: gpu.sh exit $rc; outputs in $out/gpu.tgz"
exit $rc
