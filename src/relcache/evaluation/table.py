"""The bench table: one measured row per method, and the run's result in text (Markdown) and files.

``bench.run_bench`` measures and fills a ``BenchResult``; this module only says how it reads and where it is written
(``bench.csv``, ``bench.json``, ``bench.md``, and the pictures of ``plots``), so the table's form is changed here
without touching how methods are run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import runlog


@dataclass
class BenchRow:
    """The measured line of one method."""

    method: str
    budget: int | None
    nfc: float
    flops: float  # mean realized FLOPs of one generation (nan if not counted)
    flops_ratio: float  # against full computation
    time_s: float  # mean wall time of one generation
    speedup: float
    rel_l1: float
    psnr: float
    ssim: float
    fid2fc: float
    fid: float
    accuracy: float
    note: str = ""

    def add_note(self, said: str) -> None:
        """Append ``said`` to the row's note."""
        self.note = f"{self.note}; {said}" if self.note else said


@dataclass
class BenchResult:
    """All rows, the settings, the samples of every method (for grids), the run record (settings, versions, date,
    command line: written into every output file) and, for video, per-frame quality."""

    rows: list[BenchRow]
    settings: dict[str, Any]
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    run: dict[str, Any] = field(default_factory=dict)
    #: per method label: {"rel_l1": [...], "psnr": [...], "ssim": [...]}, one value a frame (video only)
    per_frame: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        cols = ["method", "NFC", "FLOPs ratio", "time s", "speed-up", "rel L1", "PSNR", "SSIM", "FID2FC", "FID",
                "acc %", "note"]
        head = "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|"
        lines = [head]
        for r in self.rows:
            lines.append(
                f"| {r.method} | {fmt(r.nfc, 2)} | {fmt(r.flops_ratio, 3)} | {fmt(r.time_s, 3)} | "
                f"{fmt(r.speedup, 2, 'x')} | {fmt(r.rel_l1, 4)} | {fmt(r.psnr, 2)} | {fmt(r.ssim, 4)} | "
                f"{fmt(r.fid2fc, 3)} | {fmt(r.fid, 3)} | {fmt(100 * r.accuracy, 1)} | {r.note} |"
            )
        return "\n".join(lines)

    def per_frame_markdown(self) -> str:
        """Video: PSNR and SSIM of each frame against full computation, one row a method ("" for images)."""
        if not self.per_frame:
            return ""
        frames = len(next(iter(self.per_frame.values()))["psnr"])
        head = "| method | metric | " + " | ".join(f"frame {i}" for i in range(frames)) + " |\n" + \
            "|---" * (frames + 2) + "|"
        lines = [head]
        for label, per in self.per_frame.items():
            for metric, digits in (("rel_l1", 4), ("psnr", 2), ("ssim", 4)):
                lines.append(f"| {label} | {metric} | " + " | ".join(fmt(v, digits) for v in per[metric]) + " |")
        return "\n".join(lines)

    def run_summary(self) -> list[str]:
        """The run record as lines of text (what, when, how, with which versions), for every output file."""
        run = self.run
        if not run:
            return []
        st = {k: v for k, v in run.get("settings", {}).items() if k != "methods"}
        lines = [f"command: {run.get('command')}", f"date: {run.get('date')} (UTC)"]
        lines += [f"resumed: {r['date']} ({r['command']})" for r in run.get("resumed", [])]
        lines.append("settings: " + ", ".join(f"{k}={short(v)}" for k, v in st.items()))
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items()))
        m = run.get("machine", {})
        lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if v not in (None, "")))
        return lines

    def save(self, out_dir: str | Path, pictures: bool = True) -> dict[str, Path]:
        """Write ``bench.csv``, ``bench.json`` and ``bench.md`` into ``out_dir``, each opening with the run record, and
        with ``pictures`` ``pareto.png`` and ``samples.png`` (``evaluation.plots``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [dataclasses.asdict(r) for r in self.rows]
        paths = {"csv": out / "bench.csv", "json": out / "bench.json", "md": out / "bench.md"}
        summary = self.run_summary()
        with runlog.whole(paths["csv"]) as tmp, tmp.open("w", newline="") as f:
            f.writelines(f"# {line}\n" for line in summary)
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        # standard JSON: a number not measured (NaN: no FLOP count, a peer that did not run) is null (found by
        # review: bare NaN, which strict parsers refuse)
        with runlog.whole(paths["json"]) as tmp:
            tmp.write_text(json.dumps(nan_to_null({"run": self.run, "settings": self.settings, "rows": rows,
                                                    "per_frame": self.per_frame}),
                                      indent=2, default=str, allow_nan=False))
        md = ["# relcache bench", "", *(f"- {line}" for line in summary), "", self.to_markdown()]
        if self.per_frame:
            md += ["", "## Per frame (against full computation)", "", self.per_frame_markdown()]
        with runlog.whole(paths["md"]) as tmp:
            tmp.write_text("\n".join(md) + "\n")
        if pictures:
            from .plots import save_pareto, save_samples

            paths["pareto"] = save_pareto(self, out / "pareto.png")
            if self.samples:
                paths["samples"] = save_samples(self, out / "samples.png")
        return paths


def nan_to_null(value: Any) -> Any:
    """``value`` with every float NaN (or infinity) inside dicts and lists made None (``null`` in JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_null(v) for v in value]
    return value


def short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def fmt(v: float, digits: int, unit: str = "") -> str:
    """``v`` to ``digits`` places with ``unit`` after it; "n/a" alone (no unit) where there is no number."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}{unit}"
