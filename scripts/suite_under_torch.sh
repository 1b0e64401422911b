#!/usr/bin/env bash
# Run the test suite under another torch release than the one CI installs (2.13.0, CPU wheel).
#
#     bash scripts/suite_under_torch.sh 2.15.0 OUT     # OUT/suite.txt: the versions, then pytest's output
#
# Why: pyproject.toml declares every torch release this script has passed the suite under (CI tests 2.13 only;
# other releases exist on PyPI only as CUDA builds, 4-5 GB installed, too much for each CI run). dynamo changes
# what it traces and how it guards between releases, and the compile tests count graphs and breaks, so a new
# release is declared only after this script passes on it. The run takes about 10 minutes on 2 cores, plus the
# download.
#
# It makes a virtual environment in OUT/venv, installs torch==VERSION, then relcache's dependencies and test extras
# as pyproject.toml names them (all but torch, so pip keeps the release asked for), then relcache from this checkout
# without dependencies, and runs the README's test command from a copy of the checkout's tracked files (so editing
# the checkout during the run does not change what is tested). On a machine whose pip configuration caps torch
# (a `constraint` file), run it with PIP_CONFIG_FILE=/dev/null.
set -euo pipefail
version=${1:?usage: suite_under_torch.sh TORCH_VERSION OUT}
out=${2:?usage: suite_under_torch.sh TORCH_VERSION OUT}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
python3 -m venv "$out/venv"
py="$out/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==$version"
mapfile -t deps < <("$py" - "$repo/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] != "torch":
        print(req)
EOF
)
"$py" -m pip install -q "${deps[@]}"
rm -rf "$out/src" && mkdir "$out/src"
git -C "$repo" archive HEAD | tar -x -C "$out/src"
"$py" -m pip install -q --no-deps "$out/src"
{
    echo "commit $(git -C "$repo" rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) cores"
    "$py" -c 'import diffusers, platform, torch, triton
print(f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}")'
    cd "$out/src"  # the installed copy is imported: tests read no module from the checkout
    rc=0
    "$py" -m pytest -n 2 -p no:cacheprovider 2>&1 || rc=$?
    echo "pytest exit status $rc"
    exit "$rc"
} | tee "$out/suite.txt"
