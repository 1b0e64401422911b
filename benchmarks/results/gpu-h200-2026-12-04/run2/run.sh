# device run 2 (2026-12-04): DiT-XL profile at batch 32, FLUX first-call memory, FLUX eager rows
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 3
export PYTHONUNBUFFERED=1
o=${OUT:-/tmp/out}; mkdir -p $o
s=${SMOKE:+--smoke}
timeout 60 python3 benchmarks/results/gpu-h200-2026-12-04/run2/diag.py dit $s > $o/dit_profile.txt 2>&1; echo "dit rc=$? $SECONDS s"
timeout 190 python3 benchmarks/results/gpu-h200-2026-12-04/run2/diag.py flux $o/flux_eager.json $s > $o/flux_eager.txt 2>&1; echo "flux rc=$? $SECONDS s"
grep -E "^==|GiB|\|" $o/flux_eager.txt | cut -c1-250
grep -E "^==" $o/dit_profile.txt
