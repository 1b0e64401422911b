#!/usr/bin/env bash
# Run the test suite under another torch release than the one CI installs (2.13.0, CPU wheel).
#
#     bash scripts/suite_under_torch.sh 2.15.0 OUT              # OUT/suite.txt: the versions, then pytest's output
#     bash scripts/suite_under_torch.sh 2.15.0 OUT tests/test_layering.py   # pytest arguments in place of the suite
#
# Why: pyproject.toml declares every torch release this script has passed the suite under (CI tests 2.13 only;
# other releases exist on PyPI only as CUDA builds, 4-5 GB installed, too much for each CI run). dynamo changes
# what it traces and how it guards between releases, and the compile tests count graphs and breaks, so a new
# release is declared only after this script passes on it. The run takes about 10 minutes on 2 cores, plus the
# download.
#
# It makes a virtual environment in OUT/venv and installs, in one pip call (so pip cannot swap the torch asked for),
# torch==VERSION with relcache's other dependencies and test extras as pyproject.toml names them. Then it installs
# relcache without dependencies from a copy of the checkout's HEAD commit (committed files only: uncommitted edits
# are not tested) and runs the README's test command in that copy. On a machine whose pip configuration caps torch
# (a `constraint` file), run it with PIP_CONFIG_FILE=/dev/null.
set -euo pipefail
usage="usage: suite_under_torch.sh TORCH_VERSION OUT [PYTEST_ARGS...]"
version=${1:?$usage}
out=${2:?$usage}
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd -P)
out=$(realpath -m "$out")
case "$out/" in  # it deletes and rewrites folders under OUT
    "$repo"/*) echo "suite_under_torch.sh: OUT must lie outside the checkout ($repo), got $out" >&2; exit 2 ;;
esac
mkdir -p "$out"
commit=$(git -C "$repo" rev-parse HEAD)  # read once: the copy and the label are the same commit
python3 -m venv "$out/venv"
py="$out/venv/bin/python"
"$py" -m pip install -q --upgrade pip
reqs=$("$py" - "$repo/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] != "torch":
        print(req)
PYEOF
)
mapfile -t deps <<<"$reqs"
"$py" -m pip install -q "torch==$version" "${deps[@]}"
rm -rf "$out/relcache-src" && mkdir "$out/relcache-src"
git -C "$repo" archive "$commit" | tar -x -C "$out/relcache-src"
"$py" -m pip install -q --no-deps "$out/relcache-src"
{
    echo "commit ${commit:0:7}, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) cores"
    "$py" - <<'PYEOF'
import importlib.util, platform
import diffusers, torch
triton = importlib.util.find_spec("triton") and __import__("triton").__version__  # Linux x86_64 only (test extras)
print(f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton or 'absent'}, "
      f"diffusers {diffusers.__version__}")
PYEOF
    cd "$out/relcache-src"  # the installed copy is imported: tests read no module from the checkout
    rc=0
    "$py" -m pytest -n 2 -p no:cacheprovider "$@" 2>&1 || rc=$?
    echo "pytest exit status $rc"
    exit "$rc"
} | tee "$out/suite.txt"
