# device run 3 (2026-12-04): FLUX-shaped eager rows against diffusers' caches (after the disable fix), DiT-XL syncs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 3
export PYTHONUNBUFFERED=1
o=${OUT:-/tmp/out}; mkdir -p $o
cd benchmarks
if [ -n "${SMOKE:-}" ]; then f=(--smoke --repeats 1); s=(--models T --dtype float32); else f=(--repeats 2); s=(--models XL --dtype bfloat16); fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $o/gpu.txt 2>&1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" >> $o/gpu.txt 2>&1; date -u >> $o/gpu.txt
timeout 125 python3 flux_speed.py "${f[@]}" --out $o/flux_eager.json > $o/flux_eager.txt 2>&1; echo "== flux_eager: exit $?, $SECONDS s" | tee -a $o/gpu.txt
[ -n "${SMOKE:-}" ] || { timeout 35 python3 syncs.py "${s[@]}" > $o/syncs.txt 2>&1; echo "== syncs: exit $?, $SECONDS s" | tee -a $o/gpu.txt; }
grep -E "^\||GiB|eager|left out|Error" $o/flux_eager.txt | cut -c1-250; tail -8 $o/syncs.txt 2>/dev/null | cut -c1-300
