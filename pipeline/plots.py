"""Pictures people would rather look at than read: curves, bar charts, overlays."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

# Said on every picture made from random-init features (visibly, and in the PNG's text chunks).
RANDOM_INIT_CAVEAT = "random-init encoder: numbers are not the paper's"
CAVEAT_KEY = "Caveat"  # the PNG text chunk that records it (``PIL.Image.open(png).text``)
NOTES_KEY = "Notes"  # the notes printed under a chart (what its error bars are), recorded the same way


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, out: str | Path, *, notes: list[str], caveat: bool, **savefig) -> Path:
    """Notes under the plot (the caveat first, in red), then the PNG with both in its text chunks.

    ``bbox_inches="tight"`` keeps everything drawn, notes and legends outside the axes included.
    """
    lines = ([RANDOM_INIT_CAVEAT] if caveat else []) + list(notes)
    for i, line in enumerate(lines):
        fig.text(0.01, -0.01 - 0.05 * i, line, ha="left", va="top", fontsize=8,
                 color="#b22222" if caveat and i == 0 else "#333333")
    metadata = ({CAVEAT_KEY: RANDOM_INIT_CAVEAT} if caveat else {}) | ({NOTES_KEY: "\n".join(notes)} if notes else {})
    fig.savefig(out, bbox_inches="tight", metadata=metadata, **savefig)
    _pyplot().close(fig)
    return Path(out)


def read_records(metrics_path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]


def curves_figure(records: list[dict]):
    """Training loss (and validation mIoU when logged) against steps; None when nothing was logged."""
    steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
    vals = [(r["step"], r["miou"]) for r in records if r.get("event") == "val"]
    if not steps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if vals else 1, figsize=(10 if vals else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(*zip(*steps), color="#1f77b4", marker="." if len(steps) < 40 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("BCE loss")
    ax.set_title(f"training loss (steps 1-{steps[-1][0]}, {len(steps)} points)")
    ax.grid(alpha=0.3)
    if vals:
        ax = axes[0, 1]
        ax.plot(*zip(*vals), marker="o", color="#d62728")
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (%)")
        ax.set_title("novel-class mIoU")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(*, metrics_path: str | Path, out: str | Path, pretrained: bool | None = None) -> Path | None:
    """``curves_figure`` of a run's ``metrics.jsonl`` as one PNG, with the random-init caveat when
    its features were not pretrained (``pretrained`` None: as its ``start`` record says)."""
    records = read_records(metrics_path)
    fig = curves_figure(records)
    if fig is None:
        return None
    if pretrained is None:
        pretrained = all(r.get("pretrained_features", True) for r in records if r.get("event") == "start")
    return _finish(fig, out, notes=[], caveat=not pretrained, dpi=110)


def palette(count: int) -> np.ndarray:
    """Distinct RGB colours of labels 1..count, [count, 3] uint8 (imgviz's label colour map, the
    PASCAL VOC one: label 0, the background, is black)."""
    import imgviz

    colours = imgviz.label_colormap()  # [256, 3]
    return colours[1 + np.arange(count) % (len(colours) - 1)]


def save_label_png(labels: np.ndarray, out: str | Path, *, caveat: bool = False) -> Path:
    """A label map as a palette PNG: pixel values stay the label numbers (0 = background), and
    viewers show them in :func:`palette`'s colours instead of near-black greys. Label maps with
    numbers above 255 (uint16) are saved as 16-bit greyscale PNGs, which keep the numbers exactly.
    Drawing on a label map would change its numbers: ``caveat`` goes into its text chunks only."""
    from PIL import Image

    import imgviz

    if labels.dtype == np.uint16 or (labels.size and labels.max() > 255):
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"label numbers must be in 0..65535, got {labels.min()}..{labels.max()}")
        Image.fromarray(labels.astype(np.uint16)).save(out, pnginfo=png_caveat(caveat))  # mode I;16: 16-bit
        return Path(out)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(imgviz.label_colormap().flatten().tolist())
    image.save(out, pnginfo=png_caveat(caveat))
    return Path(out)


def png_caveat(caveat: bool):
    """PIL ``pnginfo`` recording the random-init caveat in a PNG written without matplotlib."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if caveat:
        info.add_text(CAVEAT_KEY, RANDOM_INIT_CAVEAT)
    return info


OVERLAY_PIXELS = 2048  # longest side of the image drawn in an overlay
LEGEND_ROWS = 40  # beyond this many classes the legend lists the largest ones present


def overlay(*, image: np.ndarray, labels: np.ndarray, names: list[str], out: str | Path, title: str = "",
            alpha: float = 0.5, caveat: bool = False) -> Path:
    """The image with each class's pixels tinted, and a legend naming the colours (``caveat``:
    the labels come from random-init features, said under the picture)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    colours = palette(len(names))
    shares = np.bincount(labels.ravel(), minlength=len(names) + 1)[1:len(names) + 1] / max(labels.size, 1)
    # The figure is ~600 px tall: a large photo is subsampled before tinting (no full-size float copy).
    step = max(1, -(-max(image.shape[:2]) // OVERLAY_PIXELS))
    image, labels = image[::step, ::step], labels[::step, ::step]
    lut = np.concatenate([np.zeros((1, 3)), colours]).astype(np.float32)  # label -> colour, 0 untinted
    tinted = image.astype(np.float32)
    where = (labels > 0) & (labels <= len(names))
    tinted[where] = (1 - alpha) * tinted[where] + alpha * lut[labels[where]]
    height, width = image.shape[:2]
    fig, ax = plt.subplots(figsize=(max(4.0, 6.0 * width / max(height, 1)), 6.0))
    ax.imshow(tinted.astype(np.uint8))
    ax.axis("off")
    shown = range(len(names)) if len(names) <= LEGEND_ROWS else [
        j for j in np.argsort(-shares, kind="stable")[:LEGEND_ROWS] if shares[j] > 0]
    handles = [Patch(color=colours[j] / 255.0, label=f"{names[j]} ({shares[j] * 100:.1f}%)") for j in shown]
    if len(handles) < len(names):
        handles.append(Patch(color="none", label=f"(+{len(names) - len(handles)} classes not listed)"))
    # The legend beside the photo, never over it.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, out, notes=[], caveat=caveat, dpi=100)


def error_bar_note(*, errors: bool, seeds: int) -> str:
    """What the chart's error bars are, or why there are none."""
    if errors and seeds > 1:
        return f"bars: mean over seeds; error bars: ± std over seeds (n={seeds})"
    return "no error bars: one seed per bar" if seeds <= 1 else "no error bars drawn"


def bar_chart_figure(*, rows: dict[str, float], errors: dict[str, float] | None = None, title: str = "",
                     ylabel: str = "mIoU (%)"):
    """One bar per row (e.g. encoder pair or variant), with error bars when given; a long title wraps."""
    plt = _pyplot()
    labels = list(rows)
    width = max(5.0, 0.9 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    yerr = [errors.get(k, 0.0) for k in labels] if errors else None
    ax.bar(range(len(labels)), [rows[k] for k in labels], yerr=yerr, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:  # about 8 characters per inch at 11 pt: wrapped to the figure's width, never cut off
        ax.set_title(textwrap.fill(title, width=max(20, int(8 * width))), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def bar_chart(*, rows: dict[str, float], errors: dict[str, float] | None = None, out: str | Path,
              title: str = "", ylabel: str = "mIoU (%)", seeds: int = 1, caveat: bool = False) -> Path:
    """``bar_chart_figure`` as a PNG, its error bars explained under it, with the random-init caveat."""
    fig = bar_chart_figure(rows=rows, errors=errors, title=title, ylabel=ylabel)
    return _finish(fig, out, notes=[error_bar_note(errors=bool(errors), seeds=seeds)], caveat=caveat, dpi=110)
