"""Pictures people put in slides: a label map that is not black, a legend beside the photo."""

from __future__ import annotations

import imgviz
import numpy as np
from PIL import Image

from pipeline.plots import overlay, palette, save_label_png


def test_labels_png_is_a_palette_image_keeping_the_label_numbers(tmp_path):
    labels = np.zeros((12, 16), np.uint8)
    labels[2:6, 2:6], labels[6:, 8:] = 1, 3
    image = Image.open(save_label_png(labels, tmp_path / "labels.png"))
    assert image.mode == "P"  # a plain L image of 0..3 looked black
    assert np.array_equal(np.asarray(image), labels)
    rgb = np.asarray(image.convert("RGB"))
    assert np.array_equal(rgb[3, 3], imgviz.label_colormap()[1]) and rgb[3, 3].max() > 100
    assert np.array_equal(palette(3), imgviz.label_colormap()[1:4])  # the overlay's colours are the same


def test_the_overlay_legend_sits_beside_the_photo(tmp_path):
    labels = np.zeros((40, 60), np.uint8)
    labels[:20] = 1
    out = overlay(image=np.zeros((40, 60, 3), np.uint8), labels=labels, names=["a very long class name"],
                  out=tmp_path / "overlay.png")
    width, height = Image.open(out).size
    assert width > 1.2 * height * 60 / 40  # wider than the photo alone: the legend has its own room
