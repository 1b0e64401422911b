"""What a ``relcache bench`` run has finished, kept on disk as it goes, so an interrupted run loses at most the
generation in flight and ``--resume`` continues it.

Layout of the output directory:

* ``results.jsonl``: append-only, one JSON object a line, flushed and fsynced after each. The first line
  (``"kind": "run"``) records the settings, the versions, the date and the command line; each finished generation
  adds a ``"kind": "result"`` line (method, budget, batch, seconds, NFC, FLOPs and where its samples are); each
  resumption adds a ``"kind": "resume"`` line (date and command line). Under ``torchrun`` rank ``r > 0`` writes
  ``results.rank<r>.jsonl`` beside it (same layout; a resumed run reads them all).
* ``samples/rank<r>/m<NN>.bin``: the samples of method ``NN`` (its position in the run's method list), float32,
  appended batch after batch; a result line names the byte offset and shape of its batch. Samples are written
  (and fsynced) before their result line, so a line always points at complete data; bytes past the last line
  (a generation killed while writing) are never read.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

LOG = "results.jsonl"
SAMPLES = "samples"

#: one generation's (samples, seconds, NFC, FLOPs)
Generation = tuple[torch.Tensor, float, float, float]


class ResumeError(ConfigError):
    """``--resume`` on a directory whose recorded run differs from the new one (or is unreadable)."""


#: the versions ``--resume`` requires to be the ones recorded (the others are recorded only)
COMPARED_VERSIONS = ("relcache", "torch", "diffusers")


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


def log_paths(directory: Path) -> list[Path]:
    """Every rank's log in ``directory``, rank 0's first."""
    return sorted(directory.glob("results*.jsonl"), key=lambda p: (p.name != LOG, p.name))


def has_log(directory: str | Path) -> bool:
    return bool(log_paths(Path(directory)))


def read_header(directory: str | Path) -> dict[str, Any] | None:
    """The ``"kind": "run"`` record of rank 0's log, or None when there is none."""
    path = Path(directory) / LOG
    if not path.is_file():
        return None
    with path.open() as f:
        first = f.readline()
    try:
        header = json.loads(first)
    except ValueError:
        raise ResumeError(f"cannot resume: the first line of {path} is not a run record") from None
    if header.get("kind") != "run":
        raise ResumeError(f"cannot resume: the first line of {path} is not a run record")
    return header


def read_resumes(directory: str | Path) -> list[dict[str, Any]]:
    """(date, command) of each earlier resumption recorded in rank 0's log."""
    out = []
    for line in (Path(directory) / LOG).read_text().splitlines():
        if '"kind": "resume"' in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out.append({"date": rec.get("date"), "command": rec.get("command")})
    return out


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key whose value differs (nested dicts key by key)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and _canonical(a) != _canonical(b):
            def named(x: Any) -> Any:  # a method's record by its label
                return x.get("label", x) if isinstance(x, dict) else x

            def left(xs: list, minus: list) -> list:  # xs without minus's items, each as often as minus has it
                count = collections.Counter(_canonical(y) for y in minus)
                out = []
                for x in xs:
                    key = _canonical(x)
                    if count[key]:
                        count[key] -= 1
                    else:
                        out.append(named(x))
                return out

            gone, new_items = left(a, b), left(b, a)
            what = [f"not in the new run: {_short(gone)}"] * bool(gone)
            what += [f"new: {_short(new_items)}"] * bool(new_items)
            out.append(f"{prefix}{key}: {len(a)} -> {len(b)} items; "
                       + ("; ".join(what) or "the same items in another order"))
        elif _canonical(a) != _canonical(b):
            out.append(f"{prefix}{key}: {' -> '.join(_from_difference(_canonical(a), _canonical(b)))}")
    return out


def _from_difference(a: str, b: str) -> tuple[str, str]:
    """``a`` and ``b`` shortened so that each shows where they start to differ (a long shared start cut)."""
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    if same > 40:
        a, b = "..." + a[same - 20:], "..." + b[same - 20:]
    return _cut(a), _cut(b)


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(v: Any) -> str:
    return _cut(_canonical(v))


def _cut(s: str) -> str:
    return s if len(s) <= 120 else s[:117] + "..."


def check_resumable(directory: str | Path, settings: dict[str, Any], vers: dict[str, str] | None = None) -> None:
    """Refuse (``ResumeError``) when ``directory``'s recorded run has other settings or versions than these.

    Only the keys given are compared for the settings (the command line checks its own settings before loading a
    model; ``run_bench`` checks the full set, methods included, before generating)."""
    header = read_header(directory)
    if header is None:
        return
    recorded = {k: header.get("settings", {}).get(k, "(absent)") for k in settings}
    diff = differences(recorded, settings)
    if vers is not None:
        old = header.get("versions", {})
        diff += [f"version {d}" for d in differences({k: old.get(k, "(absent)") for k in COMPARED_VERSIONS},
                                                     {k: vers.get(k, "(absent)") for k in COMPARED_VERSIONS})]
    if diff:
        raise ResumeError(
            f"cannot resume the run in {directory} (started {header.get('date')}, command: {header.get('command')}): "
            "its settings differ from these: " + "; ".join(diff)
            + ". Resume with the same settings, or pass --overwrite or another --out to start a new run"
        )


@dataclass
class RunLog:
    """The open log of one rank (see the module docstring)."""

    directory: Path
    rank: int
    methods: list[str]

    @property
    def path(self) -> Path:
        return self.directory / (LOG if self.rank == 0 else f"results.rank{self.rank}.jsonl")

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def start(self, record: dict[str, Any]) -> None:
        """Write the run record (a new log) or a resume record; a rank new to the run gets the run record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if record["kind"] == "resume" and not self.path.exists():
            record = {**read_header(self.directory), "resumed_by": record}
        self._drop_cut_line()
        self._append(record)

    def _drop_cut_line(self) -> None:
        """Cut a last line that a kill left unfinished (no newline): appended to, it would join the next record and
        make the log unreadable to every later ``--resume`` (found by review). Its generation is the one lost."""
        if not self.path.exists():
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, label: str, budget: int | None, batch: int, gen: Generation) -> None:
        """Record one finished generation: its samples first (fsynced), then its line."""
        samples, seconds, nfc, flops = gen
        index = self.methods.index(label)
        rel = Path(SAMPLES) / f"rank{self.rank}" / f"m{index:02d}.bin"
        path = self.directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = samples.detach().to("cpu", torch.float32).contiguous().numpy()
        with path.open("ab") as f:
            offset = f.seek(0, os.SEEK_END)
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._append({"kind": "result", "method": label, "budget": budget, "batch": batch, "seconds": seconds,
                      "nfc": nfc, "flops": flops,
                      "samples": {"file": rel.as_posix(), "offset": offset, "shape": list(data.shape)}})


#: the way on from a damaged record
_START_AGAIN = " (run the command with --overwrite instead of --resume to start again)"

def load_results(directory: str | Path, batches: set[int] | None = None,
                 sessions: dict[tuple[str, int], str] | None = None) -> dict[tuple[str, int], Generation]:
    """Every recorded generation in ``directory`` (all ranks' logs), keyed by (method label, batch); only the
    ``batches`` given, when given. A line cut short by a kill (the last one of a log) is ignored. ``sessions``, when
    given, gets the session each was timed in: the log and line of the run or resume record it follows (dates, to
    the second, can be equal)."""
    directory = Path(directory)
    out: dict[tuple[str, int], Generation] = {}
    for path in log_paths(directory):
        lines = path.read_text().splitlines()
        session = ""
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    continue  # the line being written when the run was killed
                raise ResumeError(f"cannot resume: line {i + 1} of {path} is not JSON{_START_AGAIN}") from None
            if rec.get("kind") in ("run", "resume"):
                session = f"{path.name}:{i + 1}"
            if rec.get("kind") != "result" or (batches is not None and rec["batch"] not in batches):
                continue
            if sessions is not None:
                sessions[(rec["method"], rec["batch"])] = session
            where = rec["samples"]
            shape = tuple(where["shape"])
            count = int(np.prod(shape))
            samples = directory / where["file"]
            if not samples.is_file():  # found by review: a traceback (FileNotFoundError)
                raise ResumeError(f"cannot resume: {samples}, which {path} names, is missing{_START_AGAIN}")
            data = np.fromfile(samples, dtype=np.float32, count=count, offset=where["offset"])
            if data.size != count:
                raise ResumeError(f"cannot resume: {where['file']} is shorter than {path} says{_START_AGAIN}")
            out[(rec["method"], rec["batch"])] = (torch.from_numpy(data.reshape(shape).copy()), float(rec["seconds"]),
                                                  float(rec["nfc"]), float(rec["flops"]))
    return out


#: what a finished run writes beside its log
OUTPUTS = ("bench.csv", "bench.json", "bench.md", "pareto.png", "samples.png")


def clear(directory: str | Path) -> None:
    """Remove an earlier run's log, samples and outputs (``--overwrite``); nothing else in ``directory``."""
    import shutil

    directory = Path(directory)
    for path in [*log_paths(directory), *(directory / name for name in OUTPUTS)]:
        path.unlink(missing_ok=True)
    if (directory / SAMPLES).is_dir():
        shutil.rmtree(directory / SAMPLES)
