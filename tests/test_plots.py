"""Pictures people put in slides: a label map that is not black, a legend beside the photo, a chart
whose title fits and whose error bars are explained, curves with their last step, the random-init caveat."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.plots import (
    CAVEAT_KEY,
    NOTES_KEY,
    RANDOM_INIT_CAVEAT,
    CLASS_PALETTE,
    bar_chart,
    bar_chart_figure,
    class_colours,
    curves_figure,
    legend,
    overlay,
    overlay_figure,
    plot_curves,
    read_records,
    save_label_png,
)
from pipeline.training.hooks import CURVE_POINTS, MetricsLog


def test_labels_png_is_a_palette_image_keeping_the_label_numbers(tmp_path):
    labels = np.zeros((12, 16), np.uint8)
    labels[2:6, 2:6], labels[6:, 8:] = 1, 3
    image = Image.open(save_label_png(labels, tmp_path / "labels.png"))
    assert image.mode == "P"  # a plain L image of 0..3 looked black
    assert np.array_equal(np.asarray(image), labels)
    rgb = np.asarray(image.convert("RGB"))
    assert rgb[3, 3].max() > 100 and rgb[0, 0].max() == 0  # classes bright, background black
    named = np.asarray(Image.open(save_label_png(labels, tmp_path / "named.png", names=["sky", "b", "road"]))
                       .convert("RGB"))
    colours = class_colours(["sky", "b", "road"])  # the overlay's and the legend's colours
    assert np.array_equal(named[3, 3], colours[0]) and np.array_equal(named[8, 10], colours[2])


def test_class_colours_are_stable_per_name_and_distinct():
    one, other = class_colours(["sky", "road"]), class_colours(["road", "cat", "sky", "person"])
    assert np.array_equal(one[0], other[2]) and np.array_equal(one[1], other[0])  # whatever the order and company
    names = [f"class {i}" for i in range(len(CLASS_PALETTE))]
    assert len({tuple(c) for c in class_colours(names)}) == len(names)  # a full palette: no two alike
    # not the VOC map, where label 1 is dark red whatever its name
    assert not np.array_equal(class_colours(["sky"])[0], class_colours(["road"])[0])
    palette = CLASS_PALETTE.astype(int)
    closest = min(np.abs(a - b).sum() for i, a in enumerate(palette) for b in palette[i + 1:])
    assert closest >= 60 and palette.sum(axis=1).min() > 100 and palette.min(axis=1).max() < 250


def test_the_overlay_has_no_band_under_the_photo(tmp_path):
    green = np.zeros((120, 180, 3), np.uint8)
    green[..., 1] = 200
    out = overlay(image=green, labels=np.zeros((120, 180), np.uint8), names=["cat", "dog"], out=tmp_path / "o.png",
                  title="photo.jpg")
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    is_photo = (np.abs(pixels - [0, 200, 0]).sum(axis=2) < 30).any(axis=1)
    below = len(is_photo) - 1 - np.flatnonzero(is_photo)[-1]
    assert below <= 12  # the save's own 0.1 in padding at 100 dpi, not a band


def test_the_random_init_caveat_is_a_banner_inside_the_photo(tmp_path):
    fig = overlay_figure(image=np.zeros((120, 180, 3), np.uint8), labels=np.zeros((120, 180), np.uint8),
                         names=["cat"], caveat=True)
    fig.canvas.draw()
    photo = fig.axes[0].get_window_extent()
    (banner,) = [t for t in fig.axes[0].texts if t.get_text() == RANDOM_INIT_CAVEAT.upper()]
    box = banner.get_bbox_patch().get_window_extent()
    assert photo.x0 <= box.x0 and box.x1 <= photo.x1 and photo.y0 <= box.y0 and box.y1 <= photo.y1
    assert box.width > 0.5 * photo.width and box.y1 > photo.y1 - 0.1 * photo.height  # wide, at the top
    assert not [t for t in fig.texts if RANDOM_INIT_CAVEAT in t.get_text()]  # not small text outside


def test_the_legend_image_names_each_colour(tmp_path):
    labels = np.zeros((10, 10), np.uint8)
    labels[:5] = 2
    few = Image.open(legend(names=["sky", "road"], labels=labels, out=tmp_path / "few.png"))
    many = Image.open(legend(names=[f"class {i}" for i in range(12)], out=tmp_path / "many.png", caveat=True))
    assert many.size[1] > 3 * few.size[1] and many.text[CAVEAT_KEY] == RANDOM_INIT_CAVEAT
    rgb = np.asarray(few.convert("RGB")).reshape(-1, 3)
    for colour in class_colours(["sky", "road"]):
        assert (np.abs(rgb.astype(int) - colour).sum(axis=1) < 6).sum() > 100  # each swatch drawn


def test_the_overlay_legend_sits_beside_the_photo(tmp_path):
    labels = np.zeros((40, 60), np.uint8)
    labels[:20] = 1
    out = overlay(image=np.zeros((40, 60, 3), np.uint8), labels=labels, names=["a very long class name"],
                  out=tmp_path / "overlay.png")
    width, height = Image.open(out).size
    assert width > 1.2 * height * 60 / 40  # wider than the photo alone: the legend has its own room


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_a_long_sweep_title_wraps_and_stays_inside_the_figure():
    title = "Table 2: vision and text encoder pairs on PASCAL-5i, every fold, against the released recipe"
    fig = bar_chart_figure(rows={"clip-b / clip-b": 40.0, "dino-b / minilm": 30.0}, title=title)
    fig.canvas.draw()
    box, shown = fig.axes[0].title.get_window_extent(), fig.axes[0].get_title()
    assert "\n" in shown and shown.replace("\n", " ") == title  # wrapped, nothing dropped
    assert box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1  # not cut off


@pytest.mark.parametrize(("seeds", "errors", "needle"), [
    (3, {"a": 1.0, "b": 2.0}, "error bars: ± std over seeds (n=3)"),
    (1, None, "no error bars: one seed per bar"),
])
def test_the_sweep_chart_says_what_its_error_bars_are(tmp_path, seeds, errors, needle):
    out = bar_chart(rows={"a": 10.0, "b": 20.0}, errors=errors, out=tmp_path / "chart.png", title="t", seeds=seeds)
    assert needle in Image.open(out).text[NOTES_KEY]


def _log_run(path, *, total: int, log_every: int) -> list[dict]:
    log = MetricsLog()
    log.path = path
    for step in range(1, total + 1):
        log.after_step(SimpleNamespace(step=step, total_steps=total, config=SimpleNamespace(log_every=log_every),
                                       epoch=0, loss_value=lambda step=step: 1.0 / step, lr=0.1,
                                       wait_fraction=0.0))
    return read_records(path)


@pytest.mark.parametrize(("total", "log_every"), [(37, 10), (45, 10), (203, 10), (1000, 10), (3, 10)])
def test_curves_log_the_last_step_and_enough_points(tmp_path, total, log_every):
    records = _log_run(tmp_path / "metrics.jsonl", total=total, log_every=log_every)
    steps = [r["step"] for r in records]
    assert steps[0] == 1 and steps[-1] == total  # the last step is on the curve (203 % 10 != 0)
    assert len(steps) >= min(total, CURVE_POINTS)
    assert len(steps) <= max(2 * CURVE_POINTS, total // log_every) + 2  # no more than needed; log_every caps long runs
    fig = curves_figure(records)
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata())[-1] == total and f"steps 1-{total}" in " ".join(_texts(fig))


def test_every_picture_of_random_init_features_carries_the_caveat(tmp_path):
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10] = 1
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "start", "pretrained_features": false}\n{"step": 1, "loss": 0.5}\n'
                       '{"step": 2, "loss": 0.4}\n')
    for caveat in (True, False):
        pictures = [
            overlay(image=np.zeros((20, 30, 3), np.uint8), labels=labels, names=["cat"], out=tmp_path / "o.png",
                    caveat=caveat),
            save_label_png(labels, tmp_path / "labels.png", caveat=caveat),
            legend(names=["cat"], labels=labels, out=tmp_path / "legend.png", caveat=caveat),
            bar_chart(rows={"a": 1.0}, out=tmp_path / "chart.png", caveat=caveat),
            plot_curves(metrics_path=metrics, out=tmp_path / "curves.png", pretrained=not caveat),
        ]
        for picture in pictures:
            assert (Image.open(picture).text.get(CAVEAT_KEY) == RANDOM_INIT_CAVEAT) is caveat, picture
    assert np.array_equal(np.asarray(Image.open(tmp_path / "labels.png")), labels)  # the numbers are untouched
    # the run's own start record decides when the caller does not say
    assert Image.open(plot_curves(metrics_path=metrics, out=tmp_path / "c2.png")).text[CAVEAT_KEY]
