"""The bench's pictures: method families, the Pareto front, labels that never overlap, and both PNGs written with
the run record."""

import dataclasses
import itertools
import math

import torch

from relcache.evaluation.plots import family, pareto_front, place_labels, save_pareto, save_samples
from relcache.evaluation.table import BenchResult, BenchRow


def test_family_drops_the_budget_from_a_label():
    assert family("RFC NFC=14 m=2 + CFG-Cache") == "RFC + CFG-Cache"
    assert family("FORA N=4") == "FORA" and family("RCS alone NFC=7 m=2") == "RCS alone"
    assert family("diffusers MagCache NFC~14 t=0.0899 K=4") == "diffusers MagCache"
    assert family("cache-dit DBCache F1B0+TS1 NFC~8 t=0.131") == "cache-dit DBCache F1B0+TS1"
    assert family("FasterCache (defaults)") == "FasterCache (defaults)"


def test_pareto_front_keeps_the_points_nothing_beats():
    pts = [(1.0, 0.5), (2.0, 0.1), (1.5, 0.6), (3.0, 0.1), (0.5, 0.9), (2.5, 0.05)]
    # (1.5, 0.6) is beaten by (1.0, 0.5); (3.0, 0.1) by (2.0, 0.1)
    assert pareto_front(pts) == [4, 0, 1, 5]


def _rows(n_budgets=5):
    rows = [BenchRow("full computation", None, 50, 1e9, 1.0, 2.0, 1.0, 0.0, 100, 1.0, math.nan, math.nan, math.nan)]
    for k, (name, err) in itertools.product(range(n_budgets), [("FORA", 0.06), ("TaylorSeer", 0.04),
                                                               ("RFC", 0.01), ("diffusers MagCache", 0.1)]):
        nfc = 14 - 2 * k
        label = f"{name} NFC={nfc}" if name != "diffusers MagCache" else f"{name} NFC~{nfc} t=0.1"
        rows.append(BenchRow(label, nfc, nfc, 1e9 * nfc / 50, nfc / 50, 0.5 + 0.05 * nfc + 0.01 * len(name),
                             1.0, err * (1 + 0.2 * (14 - nfc)), 30, 0.9, math.nan, math.nan, math.nan))
    return rows


def test_labels_never_overlap_each_other_or_leave_the_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    pts = [(1 + 0.02 * i, 1 + 0.01 * (i % 7)) for i in range(40)]  # a dense cluster: most labels cannot fit
    ax.scatter(*zip(*pts, strict=True))
    ax.set_xlim(0.9, 2)
    ax.set_ylim(0.95, 1.1)
    placed = place_labels(ax, pts, [f"NFC {i}" for i in range(40)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in placed]
    frame = ax.get_window_extent(renderer)
    assert 3 <= len(placed) < 40
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)


def test_both_pictures_are_written_with_the_run_record(tmp_path):
    from PIL import Image

    rows = _rows()
    run = {"command": "relcache bench --samples 4", "date": "2026-12-01T00:00:00+00:00", "settings": {"seed": 0},
           "versions": {"relcache": "0.1.0"}}
    samples = {r.method: torch.rand(3, 3, 8, 12) * 2 - 1 for r in rows[:4]}
    result = BenchResult(rows, {}, samples, run=run)
    for save, name in ((save_pareto, "pareto.png"), (save_samples, "samples.png")):
        path = save(result, tmp_path / name)
        image = Image.open(path)
        assert "command: relcache bench --samples 4" in image.text["Description"]
        assert image.size[0] > 300 and image.size[1] > 200
    video = BenchResult(rows[:2], {}, {r.method: torch.rand(1, 5, 3, 8, 8) for r in rows[:2]}, run=run)
    assert Image.open(save_samples(video, tmp_path / "video.png")).size[0] > 300  # a strip of 5 frames per row


def test_the_markdown_table_says_n_a_without_a_unit_where_a_row_has_no_time():
    """A row that did not run (its time NaN) reads "n/a" in the speed-up column, not "n/ax"; a timed row keeps its
    "x" (found by review: the table printed "n/ax")."""
    nan = math.nan
    rows = [BenchRow("full computation", None, 50, nan, 1.0, 2.0, 1.0, 0.0, nan, 1.0, nan, nan, nan),
            BenchRow("RFC NFC=14", 14, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, note="unavailable")]
    lines = BenchResult(rows, {}).to_markdown().splitlines()
    assert lines[2].split(" | ")[4] == "1.00x"
    assert lines[3].split(" | ")[4] == "n/a"


def _kept_figures(monkeypatch):
    """The figures the plots save, kept open (``plt.close`` records them instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


def test_markers_at_the_same_cost_and_error_all_show(monkeypatch, tmp_path):
    """Found by review: "RFC + CFG-Cache" (the default CFGCache() skips nothing beside RFC) has RFC's FLOPs and error,
    and its markers hid RFC's in the FLOPs panel. A marker drawn on an earlier one is smaller, so both show; the
    legend's markers keep one size."""
    rows = _rows(n_budgets=3)
    rows += [dataclasses.replace(r, method=r.method + " + CFG-Cache", time_s=r.time_s * 1.1) for r in rows
             if r.method.startswith("RFC ")]
    figs = _kept_figures(monkeypatch)
    save_pareto(BenchResult(rows, {}), tmp_path / "pareto.png")
    fig = figs[0]
    flops = fig.axes[1]
    drawn = [(c.get_label(), c.get_offsets().tolist(), list(c.get_sizes())) for c in flops.collections]
    # every marker of every family: not covered by a marker drawn later at its place of its size or more
    for i, (label, offsets, sizes) in enumerate(drawn):
        sizes = sizes * len(offsets) if len(sizes) == 1 else sizes
        for xy, s in zip(offsets, sizes, strict=True):
            later = [(o, ss if len(ss) > 1 else ss * len(o)) for _, o, ss in drawn[i + 1:]]
            covered = any(xy == p and t >= s for o, ss in later for p, t in zip(o, ss, strict=True))
            assert not covered, (label, xy)
    assert {"RFC", "RFC + CFG-Cache"} <= {label for label, _, _ in drawn}
    legend = fig.legends[0]
    assert {tuple(h.get_sizes()) for h in legend.legend_handles if hasattr(h, "get_sizes")} == {(36.0,)}
    import matplotlib.pyplot as plt

    monkeypatch.undo()
    plt.close(fig)


def test_the_run_record_footer_is_wrapped_to_the_figure(monkeypatch, tmp_path):
    """Found by review: the footer was one line, cut off at the edge of a samples.png of few samples (4 samples: it
    ended "...diffusers 0"; 1 sample: mid-command). Now it is wrapped inside the figure, whole, below the images."""
    rows = _rows(n_budgets=1)
    command = "relcache bench --samples 1 --batch-size 1 --steps 20 --budgets 14 7 --out runs/a/rather/long/path"
    run = {"command": command, "date": "2026-12-01T00:00:00+00:00", "settings": {"seed": 0},
           "versions": {"relcache": "0.1.0", "torch": "2.13.0+cpu", "diffusers": "0.42.1"}}
    figs = _kept_figures(monkeypatch)
    for n in (1, 4):
        samples = {r.method: torch.rand(n, 3, 8, 8) * 2 - 1 for r in rows}
        save_samples(BenchResult(rows, {}, samples, run=run), tmp_path / f"samples{n}.png")
    save_pareto(BenchResult(rows, {}, run=run), tmp_path / "pareto.png")
    for fig in figs:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        footer = [t for t in fig.texts if t.get_text().startswith("relcache bench --")]
        assert len(footer) == 1
        assert " ".join(footer[0].get_text().split()).endswith("diffusers 0.42.1")
        assert command in " ".join(footer[0].get_text().split())
        box = footer[0].get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0
        for ax in fig.axes:  # above the footer, labels included
            assert ax.get_tightbbox(renderer).y0 >= box.y1 - 1
    import matplotlib.pyplot as plt

    monkeypatch.undo()
    for fig in figs:
        plt.close(fig)


def test_bench_json_is_standard_json_with_null_for_numbers_not_measured(tmp_path):
    """bench.json held bare NaN (no FLOP count, an unavailable peer), which strict JSON parsers refuse (found by
    review): such numbers are null now, the measured ones as they were."""
    import json

    from relcache.evaluation.table import BenchResult

    frames = {"rel_l1": [0.01, 0.02], "psnr": [math.nan, 30.0], "ssim": [0.9, 0.8]}
    BenchResult(_rows(1), {"steps": 50}, per_frame={"RFC NFC=14": frames}).save(tmp_path, pictures=False)

    def refuse(constant):
        raise ValueError(f"not standard JSON: {constant}")

    saved = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse)
    full = saved["rows"][0]
    assert full["fid2fc"] is None and full["speedup"] == 1.0
    assert saved["per_frame"]["RFC NFC=14"]["psnr"] == [None, 30.0]
