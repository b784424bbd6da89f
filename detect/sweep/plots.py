"""The sweep's two pictures: AP against CPU latency, and the AP gained from pretraining.

Both use matplotlib's object API with the Agg canvas (headless, pyplot's global state untouched) and are written
atomically, as every picture of plugdet is (`detect.eval.viz`). Each point or bar is a backbone x head x init of
`detect.sweep.report.summarise`; error bars are the sd over seeds where there are two seeds or more.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from backbones.checkpoint import atomic_open
from detect.sweep.rows import GroupRow, Stat

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
INIT_COLOURS = {"scratch": "#8c8c8c", "pretrained": "#1f77b4", "imagenet": "#ff7f0e"}
BAR_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf")  # fmt: skip


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png", dpi=120)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_ap_vs_latency(rows: Sequence[GroupRow], path: Path) -> Path:
    """AP (mean over seeds, sd as error bar) against CPU latency: one marker shape per head, one colour per init,
    each point labelled with its backbone."""
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    heads = list(dict.fromkeys(row.head for row in rows))
    shown = [row for row in rows if row.ap is not None and row.cost]
    pairs: dict[tuple[str, str], list[GroupRow]] = {}
    for row in shown:
        pairs.setdefault((row.backbone, row.head), []).append(row)
    for (backbone, head), members in pairs.items():
        xs, ys = [r.cost["latency_ms"] for r in members], [r.ap.mean for r in members]
        if len(members) > 1:  # the inits of one backbone x head share a latency: a line shows what init changes
            ax.plot(xs, ys, color="#bbbbbb", linewidth=1.0, zorder=1)
        marker = MARKERS[heads.index(head) % len(MARKERS)]
        for row, x, y in zip(members, xs, ys, strict=True):
            ax.errorbar(x, y, yerr=row.ap.sd or 0.0, fmt=marker, color=INIT_COLOURS.get(row.init, "#2ca02c"),
                        markersize=8, capsize=3, markeredgecolor="black", markeredgewidth=0.5, zorder=2)  # fmt: skip
        top = max(range(len(members)), key=lambda k: ys[k])
        ax.annotate(backbone, (xs[top], ys[top]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if not shown:
        _empty(ax, "no finished cells yet")
    else:
        threads = shown[0].cost.get("threads")
        ax.set_xlabel(f"CPU latency, batch 1 (ms, {threads} thread{'' if threads == 1 else 's'})")
        ax.set_ylabel("COCO AP")
        ax.grid(alpha=0.3)
        head_handles = [Line2D([], [], marker=MARKERS[k % len(MARKERS)], color="black", linestyle="", label=head)
                        for k, head in enumerate(heads)]  # fmt: skip
        inits = list(dict.fromkeys(row.init for row in shown))
        init_handles = [Line2D([], [], marker="o", color=INIT_COLOURS.get(init, "#2ca02c"), linestyle="", label=init)
                        for init in inits]  # fmt: skip
        fig.legend(handles=head_handles + init_handles, loc="outside right upper", title="head / init", fontsize=8)
    ax.set_title("AP against CPU latency")
    fig.set_layout_engine("constrained")
    return _save(fig, path)


def _gain_panel(ax: Any, init: str, gains: dict[tuple[str, str], Stat], heads: list[str], backbones: list[str]) -> None:
    """One init's gains: bars per backbone, grouped by head, each labelled with its mean beyond its error bar."""
    width = 0.8 / len(backbones)
    for k, backbone in enumerate(backbones):
        offset = (k - (len(backbones) - 1) / 2) * width
        xs = [h + offset for h, head in enumerate(heads) if (backbone, head) in gains]
        stats = [gains[(backbone, head)] for head in heads if (backbone, head) in gains]
        means, sds = [s.mean for s in stats], [s.sd or 0.0 for s in stats]
        ax.bar(xs, means, width * 0.9, yerr=sds, capsize=3, color=BAR_COLOURS[k % len(BAR_COLOURS)], label=backbone)
        for x, mean, sd in zip(xs, means, sds, strict=True):
            up = mean >= 0
            ax.annotate(f"{mean:+.3f}", (x, mean + sd if up else mean - sd), textcoords="offset points",
                        xytext=(0, 2 if up else -2), ha="center", va="bottom" if up else "top", fontsize=7)  # fmt: skip
    ends = [0.0] + [s.mean + sign * (s.sd or 0.0) for s in gains.values() for sign in (-1, 1)]
    low, high = min(ends), max(ends)
    if high - low < 0.02:  # gains near zero: a readable range, not a 1e-17 axis
        low, high = (low + high) / 2 - 0.01, (low + high) / 2 + 0.01
    pad = 0.15 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(heads)), heads)
    ax.set_ylabel("AP gain (AP)")
    ax.set_title(f"{init} minus scratch (same backbone, head and seed)")
    ax.grid(axis="y", alpha=0.3)


def plot_transfer_gain(rows: Sequence[GroupRow], path: Path) -> Path:
    """The AP gained over scratch: one panel per pretrained init, bars per backbone grouped by head."""
    inits = [init for init in dict.fromkeys(row.init for row in rows) if init != "scratch"]
    fig = Figure(figsize=(8.0, 2.0 + 3.0 * max(1, len(inits))))
    heads = list(dict.fromkeys(row.head for row in rows))
    backbones = list(dict.fromkeys(row.backbone for row in rows))
    if not inits:
        _empty(fig.add_subplot(), "no pretrained cells in this sweep")
    for panel, init in enumerate(inits):
        ax = fig.add_subplot(len(inits), 1, panel + 1)
        gains = {(row.backbone, row.head): row.gain for row in rows if row.init == init and row.gain is not None}
        if gains:
            _gain_panel(ax, init, gains, heads, backbones)
        else:
            _empty(ax, f"no {init} / scratch pair finished yet")
            ax.set_title(f"{init} minus scratch")
    colours = [BAR_COLOURS[k % len(BAR_COLOURS)] for k in range(len(backbones))]
    if inits and backbones:
        handles = [Patch(color=colour, label=backbone) for colour, backbone in zip(colours, backbones, strict=True)]
        fig.legend(handles=handles, loc="outside right upper", title="backbone", fontsize=8)
    fig.suptitle("AP gained from pretraining")
    fig.set_layout_engine("constrained")
    return _save(fig, path)
