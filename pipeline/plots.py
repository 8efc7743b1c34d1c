"""Pictures people would rather look at than read: curves, bar charts, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(*, metrics_path: str | Path, out: str | Path) -> Path | None:
    """Training loss (and validation mIoU when logged) against steps, as one PNG."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
    vals = [(r["step"], r["miou"]) for r in records if r.get("event") == "val"]
    if not steps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if vals else 1, figsize=(10 if vals else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(*zip(*steps), color="#1f77b4")
    ax.set_xlabel("step")
    ax.set_ylabel("BCE loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if vals:
        ax = axes[0, 1]
        ax.plot(*zip(*vals), marker="o", color="#d62728")
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (%)")
        ax.set_title("novel-class mIoU")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def palette(count: int) -> np.ndarray:
    """Distinct RGB colours of labels 1..count, [count, 3] uint8 (imgviz's label colour map, the
    PASCAL VOC one: label 0, the background, is black)."""
    import imgviz

    colours = imgviz.label_colormap()  # [256, 3]
    return colours[1 + np.arange(count) % (len(colours) - 1)]


def save_label_png(labels: np.ndarray, out: str | Path) -> Path:
    """A label map as a palette PNG: pixel values stay the label numbers (0 = background), and
    viewers show them in :func:`palette`'s colours instead of near-black greys. Label maps with
    numbers above 255 (uint16) are saved as 16-bit greyscale PNGs, which keep the numbers exactly."""
    from PIL import Image

    import imgviz

    if labels.dtype == np.uint16 or (labels.size and labels.max() > 255):
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"label numbers must be in 0..65535, got {labels.min()}..{labels.max()}")
        Image.fromarray(labels.astype(np.uint16)).save(out)  # mode I;16: a 16-bit PNG
        return Path(out)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(imgviz.label_colormap().flatten().tolist())
    image.save(out)
    return Path(out)


OVERLAY_PIXELS = 2048  # longest side of the image drawn in an overlay
LEGEND_ROWS = 40  # beyond this many classes the legend lists the largest ones present


def overlay(*, image: np.ndarray, labels: np.ndarray, names: list[str], out: str | Path, title: str = "",
            alpha: float = 0.5) -> Path:
    """The image with each class's pixels tinted, and a legend naming the colours."""
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
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


def bar_chart(*, rows: dict[str, float], errors: dict[str, float] | None = None, out: str | Path,
              title: str = "", ylabel: str = "mIoU (%)") -> Path:
    """One bar per row (e.g. encoder pair or variant), with error bars when given."""
    plt = _pyplot()
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.8))
    yerr = [errors.get(k, 0.0) for k in labels] if errors else None
    ax.bar(range(len(labels)), [rows[k] for k in labels], yerr=yerr, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
