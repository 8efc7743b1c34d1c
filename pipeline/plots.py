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
BANNER_COLOUR = "#b22222"  # the caveat's colour


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, out: str | Path, *, notes: list[str], caveat: bool, banner: bool = False, **savefig) -> Path:
    """Notes under the plot (the caveat first, in red, unless the figure drew it as a ``banner`` of
    its own), then the PNG with both in its text chunks.

    ``bbox_inches="tight"`` keeps everything drawn, notes and legends outside the axes included.
    """
    lines = ([RANDOM_INIT_CAVEAT] if caveat and not banner else []) + list(notes)
    for i, line in enumerate(lines):
        fig.text(0.01, -0.01 - 0.05 * i, line, ha="left", va="top", fontsize=8,
                 color=BANNER_COLOUR if caveat and not banner and i == 0 else "#333333")
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


# Class colours: distinct at a glance, none near black (the background) or white, readable under text.
CLASS_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
    (128, 128, 128), (255, 99, 71), (46, 139, 87), (100, 149, 237), (218, 165, 32), (199, 21, 133),
], np.uint8)


def _name_slot(name: str) -> int:
    """A slot of :data:`CLASS_PALETTE` fixed by the name alone (a digest: the same in every process)."""
    import hashlib

    return int.from_bytes(hashlib.sha1(name.strip().lower().encode()).digest()[:4], "big") % len(CLASS_PALETTE)


def class_colours(names: list[str]) -> np.ndarray:
    """RGB colours of the classes, [len(names), 3] uint8: each name keeps the palette slot its digest picks,
    so "sky" is the same colour in every picture; names whose slots collide take the next free slots (in
    name order, whatever the order given), so up to ``len(CLASS_PALETTE)`` classes are always distinct.
    More classes than that reuse slots."""
    colours = np.zeros((len(names), 3), np.uint8)
    taken: set[int] = set()
    for j in sorted(range(len(names)), key=lambda j: (_name_slot(names[j]), names[j], j)):
        slot = _name_slot(names[j])
        if len(taken) < len(CLASS_PALETTE):
            while slot in taken:
                slot = (slot + 1) % len(CLASS_PALETTE)
            taken.add(slot)
        colours[j] = CLASS_PALETTE[slot]
    return colours


def _label_palette(names: list[str] | None) -> list[int]:
    """A PNG palette: 0 black (background), 1..n the classes' colours, the rest grey levels."""
    colours = class_colours(names) if names else CLASS_PALETTE
    entries = np.stack([np.arange(256)] * 3, axis=1).astype(np.uint8)
    entries[0] = 0
    count = min(len(colours), 255)
    entries[1:1 + count] = colours[:count]
    return entries.flatten().tolist()


def save_label_png(labels: np.ndarray, out: str | Path, *, caveat: bool = False,
                   names: list[str] | None = None) -> Path:
    """A label map as a palette PNG: pixel values stay the label numbers (0 = background), and
    viewers show them in :func:`class_colours`' colours of ``names`` (label j is ``names[j-1]``, the
    overlay's and legend's colours) instead of near-black greys. Label maps with numbers above 255
    (uint16) are saved as 16-bit greyscale PNGs, which keep the numbers exactly. Drawing on a label
    map would change its numbers: ``caveat`` goes into its text chunks only (the legend shows it)."""
    from PIL import Image

    if labels.dtype == np.uint16 or (labels.size and labels.max() > 255):
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"label numbers must be in 0..65535, got {labels.min()}..{labels.max()}")
        Image.fromarray(labels.astype(np.uint16)).save(out, pnginfo=png_caveat(caveat))  # mode I;16: 16-bit
        return Path(out)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(_label_palette(names))
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
INCH_PIXELS = 100  # the overlay and legend are saved at this dpi
LEGEND_NAME_CHARS = 48  # a longer class name is cut with an ellipsis in the pictures (the files keep it whole)


def legend_name(name: str) -> str:
    """``name`` as a legend shows it: at most :data:`LEGEND_NAME_CHARS` characters."""
    return name if len(name) <= LEGEND_NAME_CHARS else name[:LEGEND_NAME_CHARS - 1].rstrip() + "\u2026"


def _legend_entries(labels: np.ndarray, names: list[str]) -> list[tuple[np.ndarray, str]]:
    """(colour, "name (share %)") of the classes a legend lists, and a last line for those left out."""
    colours = class_colours(names)
    shares = np.bincount(labels.ravel(), minlength=len(names) + 1)[1:len(names) + 1] / max(labels.size, 1)
    shown = range(len(names)) if len(names) <= LEGEND_ROWS else [
        j for j in np.argsort(-shares, kind="stable")[:LEGEND_ROWS] if shares[j] > 0]
    entries = [(colours[j] / 255.0, f"{legend_name(names[j])} ({shares[j] * 100:.1f}%)") for j in shown]
    if len(entries) < len(names):
        entries.append((None, f"(+{len(names) - len(entries)} classes not listed)"))
    return entries


def _draw_banner(ax) -> None:
    """The random-init caveat as a band across the top of the picture, inside it (a crop keeps it or
    removes the top of the picture with it)."""
    ax.text(0.5, 0.985, RANDOM_INIT_CAVEAT.upper(), transform=ax.transAxes, ha="center", va="top",
            fontsize=11, fontweight="bold", color="white", zorder=5,
            bbox={"boxstyle": "square,pad=0.4", "facecolor": BANNER_COLOUR, "edgecolor": "none", "alpha": 0.9})


def overlay_figure(*, image: np.ndarray, labels: np.ndarray, names: list[str], title: str = "",
                   alpha: float = 0.5, caveat: bool = False):
    """The tinted photo filling its axes (no margin under it), the legend in its own axes to the right,
    the caveat as a banner inside the photo."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    colours = class_colours(names)
    entries = _legend_entries(labels, names)
    # A large photo is subsampled before tinting (no full-size float copy).
    step = max(1, -(-max(image.shape[:2]) // OVERLAY_PIXELS))
    image, labels = image[::step, ::step], labels[::step, ::step]
    lut = np.concatenate([np.zeros((1, 3)), colours]).astype(np.float32)  # label -> colour, 0 untinted
    tinted = image.astype(np.float32)
    where = (labels > 0) & (labels <= len(names))
    tinted[where] = (1 - alpha) * tinted[where] + alpha * lut[labels[where]]
    height, width = image.shape[:2]
    photo_h = 6.0
    photo_w = max(photo_h * width / max(height, 1), 2.5)
    legend_w = 0.6 + 0.075 * max(len(text) for _, text in entries)
    title_h = 0.35 if title else 0.0
    fig_h = max(photo_h, 0.25 * len(entries) + 0.3) + title_h
    fig = plt.figure(figsize=(photo_w + legend_w, fig_h))
    photo_frac = photo_h / fig_h
    ax = fig.add_axes((0.0, 1 - title_h / fig_h - photo_frac, photo_w / (photo_w + legend_w), photo_frac))
    ax.imshow(tinted.astype(np.uint8), aspect="auto")
    ax.axis("off")
    if caveat:
        _draw_banner(ax)
    if title:
        fig.text(0.5 * photo_w / (photo_w + legend_w), 1 - 0.5 * title_h / fig_h, title, ha="center", va="center",
                 fontsize=10)
    handles = [Patch(color=colour if colour is not None else "none", label=text) for colour, text in entries]
    # The legend beside the photo, never over it.
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(photo_w / (photo_w + legend_w) + 0.01,
                                                                   1 - title_h / fig_h), fontsize=9, frameon=False,
               borderaxespad=0.0)
    return fig


def overlay(*, image: np.ndarray, labels: np.ndarray, names: list[str], out: str | Path, title: str = "",
            alpha: float = 0.5, caveat: bool = False) -> Path:
    """:func:`overlay_figure` as a PNG (``caveat``: the labels come from random-init features)."""
    fig = overlay_figure(image=image, labels=labels, names=names, title=title, alpha=alpha, caveat=caveat)
    return _finish(fig, out, notes=[], caveat=caveat, banner=True, dpi=INCH_PIXELS)


def legend(*, names: list[str], out: str | Path, labels: np.ndarray | None = None, caveat: bool = False) -> Path:
    """``legend.png``: a swatch of each class colour with its name (and its share of ``labels``), the
    key to ``labels.png`` and the overlay; the caveat as a banner on top."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    entries = _legend_entries(labels if labels is not None else np.zeros((1, 1), np.uint8), names)
    if labels is None:
        entries = [(colour, text.rsplit(" (", 1)[0] if colour is not None else text) for colour, text in entries]
    rows = len(entries) + (1 if caveat else 0)
    width = max(3.0, 0.9 + 0.085 * max(len(text) for _, text in entries), 4.2 if caveat else 0.0)
    fig = plt.figure(figsize=(width, 0.3 * rows + 0.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(rows + 0.3, 0)
    ax.axis("off")
    top = 0.15
    if caveat:
        ax.add_patch(Rectangle((0, 0), width, 1.0, color=BANNER_COLOUR))
        ax.text(width / 2, 0.5, RANDOM_INIT_CAVEAT, ha="center", va="center", color="white", fontsize=8,
                fontweight="bold")
        top = 1.15
    for i, (colour, text) in enumerate(entries):
        if colour is not None:
            ax.add_patch(Rectangle((0.15, top + i + 0.1), 0.45, 0.8, facecolor=colour, edgecolor="#333333"))
        ax.text(0.75, top + i + 0.5, text, va="center", fontsize=10)
    return _finish(fig, out, notes=[], caveat=caveat, banner=True, dpi=INCH_PIXELS)


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
