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
import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
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

#: the source commit ``--resume`` requires to be the recorded one where both runs know it (``provenance``: a run
#: from an installed package, or recorded before the commit was, has none; its version is still compared). Found by
#: review: the version string alone let a run recorded by other code (another commit of the same version) resume,
#: and the table mixed both codes' samples under the first commit's name. The commit is compared with its "+"
#: (uncommitted changes) marker: a clean checkout never resumes a run of a modified one or the reverse. Two modified
#: checkouts of the same commit do resume each other: what changed is not fingerprinted (a hash of the diff would
#: refuse a resume after any edit of the package, a comment or a test's tweak included, which is the normal state of
#: a developer's checkout), so the marker says "changes, not known which" and the run record keeps it for the reader.
COMPARED_COMMIT = "relcache commit"


#: the names of the logs a run writes: rank 0's ``results.jsonl`` and rank r's ``results.rank<r>.jsonl`` (r > 0)
_LOG_NAME = re.compile(r"results(?:\.rank([1-9][0-9]*))?\.jsonl")


def log_paths(directory: Path) -> list[Path]:
    """Every rank's log in ``directory``, rank 0's first, by rank. Only the names a run writes (found by review: any
    ``results*.jsonl``, a user's ``results.backup.jsonl`` included, was read as a rank's log and deleted by
    ``--overwrite``)."""
    found = [(int(m.group(1) or 0), p) for p in directory.glob("results*.jsonl")
             if (m := _LOG_NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, key=lambda rp: rp[0])]


def has_log(directory: str | Path) -> bool:
    return bool(log_paths(Path(directory)))


def read_header(directory: str | Path) -> dict[str, Any] | None:
    """The ``"kind": "run"`` record of rank 0's log, or None when there is none."""
    path = Path(directory) / LOG
    if not path.is_file():
        return None
    with path.open() as f:
        first = f.readline()
    return _check_header(path, first)


def _check_header(path: Path, line: str) -> dict[str, Any]:
    """The run record on the first line of the log ``path``; a ResumeError naming the file when it is none (found by
    review: an empty log, or a first line ``[]``, was a traceback)."""
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != "run":
        what = f"{path} is empty" if not line.strip() else f"the first line of {path} is not a run record"
        raise ResumeError(f"cannot resume: {what}{_START_AGAIN}")
    wrong = [k for k, t in (("settings", dict), ("versions", dict), ("date", str), ("command", str))
             if not isinstance(header.get(k), t)]
    if wrong:
        raise ResumeError(f"cannot resume: the run record on line 1 of {path} lacks or garbles "
                          f"{', '.join(wrong)}{_START_AGAIN}")
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
            if isinstance(rec, dict):
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
        was, now_ = old.get(COMPARED_COMMIT), vers.get(COMPARED_COMMIT)
        if was and now_ and was != now_:  # where both are known (see COMPARED_COMMIT)
            diff.append(f"{COMPARED_COMMIT}: {was} -> {now_} (the run was recorded by other code; "
                        "a \"+\" marks a checkout with uncommitted changes)")
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
                      "nfc": _json_number(nfc), "flops": _json_number(flops),
                      "samples": {"file": rel.as_posix(), "offset": offset, "shape": list(data.shape)}})


#: the way on from a damaged record
_START_AGAIN = " (run the command with --overwrite instead of --resume to start again)"

def _number(v: Any, nan: bool) -> bool:
    """``v`` is a JSON number (not a bool); NaN (written as ``NaN`` or ``null``) allowed when ``nan``."""
    if v is None:
        return nan
    return isinstance(v, int | float) and not isinstance(v, bool) and (nan or math.isfinite(v))


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_result(rec: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """What is wrong with a ``"kind": "result"`` record (None: nothing): every field ``load_results`` and the table
    use, with its type, so a hand-edited or damaged line is refused before the model loads, not a traceback after."""
    if not isinstance(rec.get("method"), str):
        return "its method is not a string"
    if rec.get("budget") is not None and not _index(rec.get("budget")):
        return "its budget is neither null nor an integer"
    if not _index(rec.get("batch")):
        return "its batch is not an integer >= 0"
    if not _number(rec.get("seconds"), nan=False) or rec["seconds"] < 0:
        return "its seconds is not a number >= 0"
    for key in ("nfc", "flops"):  # NaN where not measured (a peer without a count, --no-flops)
        if key not in rec or not _number(rec[key], nan=True):
            return f"its {key} is not a number (or NaN)"
    where = rec.get("samples")
    if not isinstance(where, dict):
        return "it names no samples"
    file = where.get("file")
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        return "its samples file is not a path inside the run's directory"
    if not _index(where.get("offset")):
        return "its samples offset is not an integer >= 0"
    shape = where.get("shape")
    if not isinstance(shape, list) or not shape or not all(_index(n) and n > 0 for n in shape):
        return "its samples shape is not a list of positive integers"
    n, size = settings.get("num_samples"), settings.get("batch_size")
    if _index(n) and _index(size) and size > 0:  # the batch's samples, as the run's settings make them
        batches = -(-n // size)
        if rec["batch"] >= batches:
            return f"its batch {rec['batch']} is past the run's last ({batches - 1})"
        if shape[0] != (want := min(size, n - rec["batch"] * size)):
            return f"its samples shape {shape} does not hold batch {rec['batch']}'s {want} samples"
    return None


def _records(directory: Path, batches: set[int] | None = None
             ) -> list[tuple[Path, int, str, dict[str, Any]]]:
    """(log, line number, session, record) of every recorded generation in ``directory`` (all ranks' logs; only the
    ``batches`` given, when given), each line of every log checked first: a ResumeError naming the file and line of
    the first that is not a record the run wrote, or whose samples are missing or short. A last line that is not
    JSON (cut short by a kill) is ignored. The session is the log and line of the run or resume record it follows."""
    out = []
    first: tuple[tuple[int, ...], str] | None = None  # every batch's samples have one shape but for the batch size
    for path in log_paths(directory):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ResumeError(f"cannot resume: {path} cannot be read ({e}){_START_AGAIN}") from None
        lines = text.splitlines()
        header = _check_header(path, lines[0] if lines else "")
        settings = header["settings"]
        session = ""
        for i, line in enumerate(lines):
            where = f"line {i + 1} of {path}"
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1 and i > 0:
                    continue  # the line being written when the run was killed
                raise ResumeError(f"cannot resume: {where} is not JSON{_START_AGAIN}") from None
            kind = rec.get("kind") if isinstance(rec, dict) else None
            if kind not in ("run", "resume", "result"):
                raise ResumeError(f"cannot resume: {where} is not a run, resume or result record{_START_AGAIN}")
            if kind == "run" and i > 0 and (other := differences(settings, rec.get("settings") or {})):
                # a second run appended to this log (two commands into one --out, before they were refused): its
                # results would be read as this run's (found by review: wrong numbers, no word)
                raise ResumeError(f"cannot resume: {where} starts another run than line 1 (other settings: "
                                  f"{', '.join(other)}){_START_AGAIN}")
            if kind != "result":
                session = f"{path.name}:{i + 1}"
                continue
            wrong = _check_result(rec, settings)
            if wrong is not None:
                raise ResumeError(f"cannot resume: {where} is not a result the run wrote: {wrong}{_START_AGAIN}")
            shape = tuple(rec["samples"]["shape"])
            first = first or (shape, where)
            if shape[1:] != first[0][1:]:
                raise ResumeError(f"cannot resume: the samples shape {list(shape)} on {where} differs from "
                                  f"{list(first[0])} on {first[1]}{_START_AGAIN}")
            samples = directory / rec["samples"]["file"]
            if not samples.is_file():  # found by review: a traceback (FileNotFoundError)
                raise ResumeError(f"cannot resume: {samples}, which {path} names, is missing{_START_AGAIN}")
            end = rec["samples"]["offset"] + 4 * math.prod(shape)
            if samples.stat().st_size < end:
                raise ResumeError(f"cannot resume: {rec['samples']['file']} is shorter than {path} says "
                                  f"(line {i + 1}){_START_AGAIN}")
            if batches is None or rec["batch"] in batches:
                out.append((path, i + 1, session, rec))
    return out


def check_log(directory: str | Path) -> None:
    """Refuse (``ResumeError``, naming the file and line) a log in ``directory`` that ``load_results`` could not
    read, without reading the samples: for the command line, before the model loads."""
    _records(Path(directory))


def load_results(directory: str | Path, batches: set[int] | None = None,
                 sessions: dict[tuple[str, int], str] | None = None) -> dict[tuple[str, int], Generation]:
    """Every recorded generation in ``directory`` (all ranks' logs), keyed by (method label, batch); only the
    ``batches`` given, when given. A line cut short by a kill (the last one of a log) is ignored; any other line that
    is not a record the run wrote is refused (``ResumeError``, see ``_records``). ``sessions``, when given, gets the
    session each was timed in: the log and line of the run or resume record it follows (dates, to the second, can be
    equal). NaN (or null) NFC and FLOPs read as NaN."""
    directory = Path(directory)
    out: dict[tuple[str, int], Generation] = {}
    for _, _, session, rec in _records(directory, batches):
        key = (rec["method"], rec["batch"])
        if sessions is not None:
            sessions[key] = session
        where = rec["samples"]
        shape = tuple(where["shape"])
        count = math.prod(shape)
        data = np.fromfile(directory / where["file"], dtype=np.float32, count=count, offset=where["offset"])
        if data.size != count:  # changed since _records looked
            raise ResumeError(f"cannot resume: {where['file']} is shorter than the log says{_START_AGAIN}")
        out[key] = (torch.from_numpy(data.reshape(shape).copy()), float(rec["seconds"]),
                    _float(rec["nfc"]), _float(rec["flops"]))
    return out


def _json_number(v: float) -> float | None:
    """``v``, or None for NaN: a log of standard JSON (``json.dumps`` writes NaN bare, which other readers refuse);
    ``load_results`` reads both None and the NaN of older logs as NaN."""
    return None if math.isnan(v) else float(v)


def _float(v: float | None) -> float:
    return math.nan if v is None else float(v)


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


@contextlib.contextmanager
def whole(path: str | Path) -> Iterator[Path]:
    """A path to write ``path``'s new content to, which then replaces ``path`` in one step (``os.replace``): an
    interrupted write leaves the earlier file whole, and an earlier file that cannot be opened for writing
    (read-only, another user's) in a directory that can be written is replaced all the same. Found by review:
    ``bench`` wrote its outputs in place, and such a file stopped it with a traceback after all the work, half its
    outputs written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
