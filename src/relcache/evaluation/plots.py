"""The pictures of a ``relcache bench`` run: ``pareto.png`` (error against cost) and ``samples.png`` (what the
errors look like).

``pareto.png`` has two panels, measured wall time and model FLOPs (NFC where FLOPs were not counted) against the
relative L1 error to full computation, both on log axes: one marker per method and budget (colour and shape per
method family, peers included), the Pareto front of each panel drawn as a step line, full computation (error 0,
which a log axis cannot show) as a dashed vertical line. Each marker is labelled with its NFC where the label fits
without overlapping another label or marker (``place_labels``); the legend names the families.

``samples.png``: one row per method, full computation first, the same seeds side by side (a strip of frames of the
first sample for video), each row labelled with the method, its NFC, time and rel L1.

Every picture carries the run record (command, date, versions) in its PNG metadata and as a footer, wrapped to the
figure's width (``footer_lines``) with the figure grown to hold it (``add_footer``).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .runlog import whole

if TYPE_CHECKING:
    from .table import BenchResult, BenchRow

FULL_LABEL = "full computation"
_MARKERS = "osD^vP*Xhp<>8"
#: the parts of a label that name a budget or a threshold, not the method
_BUDGET_PARTS = re.compile(r" (N|NFC|m|w|t|K)[=~][0-9.e+-]+")


def family(label: str) -> str:
    """The method a row's label names, without its budget (``RFC NFC=14 m=2 + CFG-Cache`` -> ``RFC + CFG-Cache``)."""
    return _BUDGET_PARTS.sub("", label).strip()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better in both), by ``x``."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metadata(result: BenchResult) -> dict[str, str]:
    return {"Title": "relcache bench", "Description": "\n".join(result.run_summary()), "Software": "relcache"}


FOOTER_FONTSIZE = 6.5
_FOOTER_SPACING = 1.3  # line spacing of a footer's lines, in font sizes


def _footer_text(result: BenchResult) -> str:
    run = result.run
    if not run:
        return ""
    v = run.get("versions", {})
    return (f"{run.get('command')}   |   {run.get('date')} UTC   |   relcache {v.get('relcache')}, "
            f"torch {v.get('torch')}, diffusers {v.get('diffusers')}")


def footer_lines(fig: Any, text: str, fontsize: float = FOOTER_FONTSIZE) -> list[str]:
    """``text`` wrapped to ``fig``'s width (less 1 % each side), as measured by its renderer: a record of one line
    was cut off at the edge of a narrow figure (found by review: a samples.png of 1 sample ended mid-command)."""
    if not text:
        return []
    renderer = fig.canvas.get_renderer()
    room = 0.98 * fig.bbox.width
    chars = max(10, int(fig.get_figwidth() * 72 / (0.5 * fontsize)))  # a first guess, a little wide
    while True:
        lines = [line for part in text.splitlines()
                 for line in textwrap.wrap(part, chars, break_on_hyphens=False) or [""]]
        probe = fig.text(0, 0, "\n".join(lines), fontsize=fontsize, linespacing=_FOOTER_SPACING)
        width = probe.get_window_extent(renderer).width
        probe.remove()
        if width <= room or chars <= 10:
            return lines
        chars = max(10, int(chars * min(0.95, room / width)))


def footer_height(lines: Sequence[str], fontsize: float = FOOTER_FONTSIZE) -> float:
    """Inches the footer of ``lines`` takes at the figure's bottom (with a little space above it)."""
    return (len(lines) * _FOOTER_SPACING * fontsize + 6) / 72 if lines else 0.0


def add_footer(fig: Any, text: str, fontsize: float = FOOTER_FONTSIZE) -> float:
    """Wrap ``text`` to ``fig``'s width, grow the figure by the footer's height and draw it at the bottom; returns
    the fraction of the (new) height the footer takes, the bottom of the rect to lay the rest out in."""
    lines = footer_lines(fig, text, fontsize)
    if not lines:
        return 0.0
    height = footer_height(lines, fontsize)
    fig.set_figheight(fig.get_figheight() + height)
    fig.text(0.01, 0.004, "\n".join(lines), fontsize=fontsize, color="0.35", ha="left", va="bottom",
             linespacing=_FOOTER_SPACING)
    return height / fig.get_figheight()


def place_labels(ax: Any, xy: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 7.0) -> list[Any]:
    """Label each point with the first of a few offsets around it where the label overlaps no label placed
    before it and no marker, inside the axes; a point with no free place stays unlabelled. Returns the placed
    annotations. (Text sizes are measured once per distinct text; candidate boxes are computed, not drawn.)"""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    pt = fig.dpi / 72  # pixels per point
    r = 4.0 * pt / 1.5  # a marker's half size in pixels, taken as taken space
    centers = [tuple(to_px((x, y))) for x, y in xy]
    taken = [(px - r, py - r, px + r, py + r) for px, py in centers]
    frame = ax.get_window_extent(renderer)
    sizes: dict[str, tuple[float, float]] = {}
    for text in set(texts):
        t = ax.text(0, 0, text, fontsize=fontsize)
        box = t.get_window_extent(renderer)
        sizes[text] = (box.width, box.height)
        t.remove()
    offsets = [(5, 3), (5, -10), (-5, 3), (-5, -10), (0, 8), (0, -14), (10, -3), (-10, -3), (14, 9), (-14, 9),
               (14, -16), (-14, -16)]
    done = []
    for (x, y), (px, py), text in zip(xy, centers, texts, strict=True):
        w, h = sizes[text]
        for dx, dy in offsets:
            x0 = px + dx * pt if dx >= 0 else px + dx * pt - w
            y0 = py + dy * pt - 0.2 * h  # the text's baseline sits at the offset; its box starts a little below
            b = (x0, y0, x0 + w, y0 + h)
            inside = frame.x0 <= b[0] and b[2] <= frame.x1 and frame.y0 <= b[1] and b[3] <= frame.y1
            if inside and not any(_overlap(b, o) for o in taken):
                taken.append(b)
                done.append(ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                                        ha="left" if dx >= 0 else "right", va="baseline", color="0.15"))
                break
    return done


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


#: a marker's area in points², as ``scatter`` takes it
_SIZE = 36.0


def _near(pts: Sequence[tuple[Any, float, float]]) -> Any:
    """A test of whether two points of a log-log panel holding ``pts`` fall within about a marker's width of each
    other (1.5 % of the panel's span in each axis)."""
    def span(values: list[float]) -> float:
        logs = [math.log10(v) for v in values if v > 0]
        return max(max(logs) - min(logs), 0.3) if logs else 1.0

    tx, ty = 0.015 * span([x for _, x, _ in pts]), 0.015 * span([y for _, _, y in pts])

    def near(p: tuple[float, float], q: tuple[float, float]) -> bool:
        if min(*p, *q) <= 0:  # off a log axis: only the same point
            return p == q
        return abs(math.log10(p[0] / q[0])) <= tx and abs(math.log10(p[1] / q[1])) <= ty

    return near


def _finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def save_pareto(result: BenchResult, path: str | Path) -> Path:
    """``pareto.png``: time and model FLOPs against rel L1 vs full computation (see the module docstring)."""
    plt = _plt()
    from matplotlib import ticker

    rows = {r.method: r for r in result.rows}
    full = rows.get(FULL_LABEL)
    others = [r for r in result.rows if r.method != FULL_LABEL and _finite(r.rel_l1, r.time_s)]
    flops_counted = any(_finite(r.flops_ratio) for r in others)
    families = list(dict.fromkeys(family(r.method) for r in others))
    if len(families) <= 10:
        colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    else:  # tab20's dark shades first, then the light ones (neighbours in tab20 are two shades of one hue)
        colors = [plt.get_cmap("tab20")(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    style = {f: (colors[i % len(colors)], _MARKERS[i % len(_MARKERS)]) for i, f in enumerate(families)}
    floor = min([r.rel_l1 for r in others if r.rel_l1 > 0] or [1e-4]) / 2  # a zero error still shows, at the bottom

    def cost(r: BenchRow, panel: int) -> float:
        if panel == 0:
            return r.time_s
        if flops_counted:
            return r.flops_ratio
        return r.nfc / full.nfc if full is not None and _finite(r.nfc, full.nfc) and full.nfc > 0 else math.nan

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.6))
    titles = ["measured wall time per generation", "model FLOPs (measured)" if flops_counted else
              "NFC (FLOPs not counted in this run)"]
    xlabels = ["time per generation (s)", "model FLOPs / full computation's" if flops_counted else "NFC / full NFC"]
    for panel, ax in enumerate(axes):
        pts = [(r, cost(r, panel), max(r.rel_l1, floor)) for r in others if _finite(cost(r, panel))]
        near = _near(pts)
        order = {fam: i for i, fam in enumerate(families)}  # the order the families are drawn in, the last on top
        for fam in families:
            mine = [(x, y) for r, x, y in pts if family(r.method) == fam]
            if mine:
                color, marker = style[fam]
                # markers at one place (the same cost and error: "RFC + CFG-Cache" beside "RFC", whose default
                # CFGCache() skips nothing) are stacked largest first, so each shows (found by review: the RFC markers
                # were hidden in the FLOPs panel): larger by the markers drawn on it, smaller by those under it
                stack = [[order[family(r.method)] for r, x, y in pts if family(r.method) != fam and near(p, (x, y))]
                         for p in mine]
                sizes = [_SIZE * 2.0 ** sum(i > order[fam] for i in s) * 0.75 ** sum(i < order[fam] for i in s)
                         for s in stack]
                ax.scatter(*zip(*mine, strict=True), color=color, marker=marker, s=sizes, label=fam, zorder=3,
                           edgecolors="white", linewidths=0.5)
        full_x = (full.time_s if panel == 0 else 1.0) if full is not None else None
        if full_x is not None and _finite(full_x):
            ax.axvline(full_x, color="0.3", linestyle="--", linewidth=1)
            ax.text(full_x, 0.98, " full computation\n (rel L1 0)", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", ha="left", color="0.3")
        cand = [(x, y) for _, x, y in pts if full_x is None or x < full_x]
        front = [cand[i] for i in pareto_front(cand)]
        if front:
            fx, fy = zip(*front, strict=True)
            ax.step(fx, fy, where="post", color="0.2", linewidth=1.2, alpha=0.7, zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the major ticks only: minor labels ran into each other
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(xlabels[panel])
        ax.set_ylabel("rel L1 against full computation (lower is better)")
        ax.set_title(titles[panel], fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        if pts:
            xs = [x for _, x, _ in pts] + ([full_x] if full_x else [])
            ys = [y for _, _, y in pts]
            ax.set_xlim(min(xs) / 1.25, max(xs) * 1.35)
            ax.set_ylim(min(ys) / 1.6, max(ys) * 1.8)
    handles, labels = axes[0].get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    for handle in legend.legend_handles:  # a family's first marker may be a small one drawn on another's
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([_SIZE])
    fig.suptitle("relcache bench: error against cost, one marker per method and budget (labels: NFC; markers "
                 "stacked large to small: the same cost and error)", fontsize=11)
    bottom = add_footer(fig, _footer_text(result))
    fig.tight_layout(rect=(0, max(bottom, 0.01), 0.83, 0.96))
    for panel, ax in enumerate(axes):
        pts = [(cost(r, panel), max(r.rel_l1, floor), r) for r in others if _finite(cost(r, panel))]
        pts.sort(key=lambda p: p[1])  # the most accurate first: they get the free places
        pts = [p for p in pts if _finite(p[2].nfc)]  # a peer whose NFC is not measured gets no label
        place_labels(ax, [(x, y) for x, y, _ in pts], [f"{r.nfc:.0f}" for _, _, r in pts])
    path = Path(path)
    with whole(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata=_metadata(result))
    plt.close(fig)
    return path


def _strip(images: Sequence[torch.Tensor]) -> tuple[Any, str | None]:
    """(C, H, W) images in [-1, 1] side by side with a white gap, as something ``imshow`` shows, and its colour
    map (one axes a row draws fast where one axes an image would not)."""
    gap = max(1, images[0].shape[-1] // 16)
    parts = []
    for img in images:
        x = ((img.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:3]
        white = 0.0 if x.shape[0] == 1 else 1.0  # grey images are drawn with gray_r (0 is white)
        parts += [x, torch.full((x.shape[0], x.shape[1], gap), white)]
    strip = torch.cat(parts[:-1], dim=2)
    if strip.shape[0] == 1:  # the reference digits: dark ink on light paper, as in the demo
        return strip[0].numpy(), "gray_r"
    return strip.permute(1, 2, 0).numpy(), None


def save_samples(result: BenchResult, path: str | Path, columns: int = 10) -> Path:
    """``samples.png``: the same seeds under full computation and each method side by side (see the module
    docstring); images are the first ``columns`` samples, videos the first sample's frames, evenly spaced."""
    plt = _plt()
    rows = {r.method: r for r in result.rows}
    labels = [label for label in result.samples if label in rows]
    first = result.samples[labels[0]]
    if first.ndim == 5:  # video: a strip of the first sample's frames
        frames = first.shape[1]
        k = min(columns, frames)
        picks = sorted({round(i * (frames - 1) / max(k - 1, 1)) for i in range(k)})
        cells = lambda s: [s[0, f] for f in picks]  # noqa: E731
        head = "first sample, frames " + ", ".join(map(str, picks))
    else:
        n = min(columns, first.shape[0])
        cells = lambda s: [s[i] for i in range(n)]  # noqa: E731
        head = f"samples 0..{n - 1} (the same seeds in every row)"
        picks = range(n)
    h, w = first.shape[-2:]
    cw, ch = 1.1 * w / max(h, w), 1.1 * h / max(h, w)  # inches per image
    fig, axes = plt.subplots(len(labels), 1, squeeze=False, figsize=(2.9 + cw * len(picks), 0.5 + ch * len(labels)))
    for i, label in enumerate(labels):
        r = rows[label]
        ax = axes[i, 0]
        data, cmap = _strip(cells(result.samples[label]))
        ax.imshow(data, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(head, fontsize=8)
        time = f"{r.time_s:.2f} s" if _finite(r.time_s) else "n/a"
        nfc = f"{r.nfc:.0f}" if _finite(r.nfc) else "n/a"
        ax.set_ylabel(f"{label}\nNFC {nfc} · {time} · rel L1 {r.rel_l1:.4f}", rotation=0, ha="right",
                      va="center", fontsize=7)
    bottom = add_footer(fig, _footer_text(result))
    fig.tight_layout(rect=(0, max(bottom, 0.01), 1, 1))
    path = Path(path)
    with whole(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata=_metadata(result))
    plt.close(fig)
    return path
