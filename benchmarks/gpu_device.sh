#!/usr/bin/env bash
# gpu.sh as the lent GPU machine runs it (the device tool's `run`), in one call. That machine has torch but no
# diffusers and reaches no package index, and at most 8 files come back from $OUT. So this script
#   1. installs diffusers from wheels carried in .wheels/ when the machine has none, and runs relcache from src/.
#      The wheels are made beforehand on a machine with PyPI, then carried (carry [".wheels"]; .wheels/ is
#      git-ignored):
#        python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels diffusers==0.42.1 \
#          importlib_metadata pytest pluggy iniconfig packaging
#   2. runs gpu.sh, whose own budget (GPU_BUDGET seconds, default 360; times 20 with --smoke) bounds every command;
#   3. runs tests/methods/test_fused.py (at most FUSED_TESTS seconds, default 100): the fused RFE forecast's Triton
#      kernels compiled for this GPU against the torch path (CPU runs check them only under Triton's interpreter);
#   4. puts gpu.txt and a tarball of every output into $OUT (default runs/gpu-device), also when a command was cut.
# Before a session, on a CPU: the device's torch is 2.11 (Triton 3.6), not the 2.13 CI runs. Run
# `bash scripts/suite_under_torch.sh 2.11.0 OUT` and `python scripts/fused_build.py` under Triton 3.6
# (docs/performance.md, "The suite under torch 2.11 and 2.12"). On 2026-12-05 the same suite in a venv made by hand
# found a graph break at every compiled record ("relcache under the GPU machine's torch 2.11").
# Usage (device tool, from the repository root, timeout_s about 520): bash benchmarks/gpu_device.sh [--smoke]
# On a machine with diffusers installed it only runs gpu.sh and packs its outputs; --smoke rehearses on the CPU.
set -uo pipefail
if [ $# -gt 1 ] || { [ $# -eq 1 ] && [ "$1" != "--smoke" ]; }; then
  echo "usage: bash benchmarks/gpu_device.sh [--smoke]  (outputs go to \$OUT)" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/runs/gpu-device}
work=$(mktemp -d /tmp/gpu-run.XXXX)
site=""
trap 'rm -rf "$work" ${site:+"$site"}' EXIT
mkdir -p "$out"
if python3 -c "import diffusers" 2>/dev/null; then
  export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
else
  shopt -s nullglob
  wheels=("$root"/.wheels/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_device.sh: no diffusers here and no wheel in .wheels/: see this script's header" | tee "$out/gpu.txt"
    exit 3
  fi
  site=$(mktemp -d /tmp/gpu-site.XXXX)
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "${wheels[@]}" 2>&1 | tee "$work/install.txt"
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "gpu_device.sh: installing ${wheels[*]} failed" | tee "$out/gpu.txt"
    cp "$work/install.txt" "$out/install.txt"
    exit 3
  fi
  echo "gpu_device.sh: installed ${wheels[*]##*/}" | tee -a "$work/install.txt"
  export PYTHONPATH="$site:$root/src${PYTHONPATH:+:$PYTHONPATH}"
fi
bash "$root/benchmarks/gpu.sh" "$@" "$work"
rc=$?
echo "== gpu_device.sh: gpu.sh exit $rc" >> "$work/gpu.txt"
if python3 -c "import pytest, triton" 2>/dev/null; then
  (cd "$root" && timeout -k 10 "${FUSED_TESTS:-100}" python3 -m pytest -o addopts= -q -p no:cacheprovider \
    --durations=5 tests/methods/test_fused.py) > "$work/fused_tests.txt" 2>&1
  tests=$?
  summary=$(grep -E '[0-9]+ (passed|failed|error)' "$work/fused_tests.txt" | tail -n 1)
  [ $tests -eq 124 ] || [ $tests -eq 137 ] && summary="cut at ${FUSED_TESTS:-100} s: Triton's compiles took too long"
  echo "== gpu_device.sh: tests/methods/test_fused.py exit $tests ($summary)" | tee -a "$work/gpu.txt"
else
  echo "== gpu_device.sh: no pytest or triton here: tests/methods/test_fused.py not run" | tee -a "$work/gpu.txt"
fi
cp "$work/gpu.txt" "$out/gpu.txt"
tar czf "$out/gpu.tgz" -C "$work" .
echo "gpu_device.sh: gpu.sh exit $rc; outputs in $out/gpu.tgz"
exit $rc
