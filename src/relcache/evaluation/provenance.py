"""What ran, where and when: the run record every output of ``relcache bench`` and ``analyze`` carries (versions,
the relcache commit, machine, date, command line). ``runlog`` compares its versions when a run is resumed."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def versions() -> dict[str, str]:
    """The versions that can change a run's numbers."""
    import importlib.metadata

    import diffusers

    try:  # the installed distribution's version (importing the top-level package would point up the layers)
        relcache_version = importlib.metadata.version("relcache")
    except importlib.metadata.PackageNotFoundError:
        relcache_version = "unknown (not installed)"
    out = {"relcache": relcache_version, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version(), "numpy": np.__version__}
    try:  # the SSIM column's numbers depend on it (docs/results.md); recorded only, so older runs still resume
        out["torchmetrics"] = importlib.metadata.version("torchmetrics")
    except importlib.metadata.PackageNotFoundError:
        pass
    if "transformers" in sys.modules:
        out["transformers"] = sys.modules["transformers"].__version__
    commit = _git_commit()
    if commit:
        out["relcache commit"] = commit
    return out


def _git_commit() -> str | None:
    """The commit of the relcache source running, when it runs from a git checkout (a "+" when it has changes)."""
    import subprocess

    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", str(here.parent)],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """Where the run ran (recorded, never compared: a resumed run may run elsewhere)."""
    return {"host": platform.node(), "platform": platform.platform(), "processor": _cpu_name(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None) -> str:
    """The command as ``relcache bench ...``: its arguments as given (``sys.argv`` when ``argv`` is None), under the
    console script's name whatever launched it (``python -m``, a test runner)."""
    import shlex

    return shlex.join(["relcache", *(sys.argv[1:] if argv is None else argv)])
