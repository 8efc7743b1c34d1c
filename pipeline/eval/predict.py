"""Prediction on new photos with free-form class names.

The frozen encoders that made the training caches are rebuilt from the stores'
attributes (same weights, same input size) and run once on the photo's
sliding windows; class names are encoded with the text store's encoder, so any
name works. All names form W at once, and each pixel takes the class with the
highest probability above the threshold (else background), as in the paper's
multi-class use.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.labels import parse_names, prompt_name
from pipeline.data.readers import open_image, rgb_array, too_many_pixels, upright
from pipeline.data.views import Stitcher, ViewParams, pad_fill, render_view, window_boxes
from pipeline.encode.text import class_embeddings, encoder_from_identity, text_encoder_of
from pipeline.eval.identity import check_stores
from pipeline.errors import UserError
from pipeline.plots import legend, overlay, png_caveat, save_label_png
from pipeline.runtime import progress
from pipeline.store.layout import open_store, store_attrs
from pipeline.training.inputs import read_run_inputs, split_normalization


def read_photo(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    return decode_photo(path, name=str(path))


def decode_photo(source, *, name: str, max_pixels: int | None = None) -> np.ndarray:
    """[H, W, 3] uint8 RGB of a photo (a path or a binary file object); anything that is not a
    readable image, or has more than ``max_pixels`` pixels, is a one-line :class:`UserError` naming it."""
    try:
        with open_image(source) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise UserError(f"{name} is {image.width} x {image.height} pixels; at most {max_pixels / 1e6:g} "
                                f"megapixels are taken")
            return rgb_array(upright(image))  # as every viewer shows it: the masks must line up with that
    except Image.DecompressionBombError as err:
        raise UserError(too_many_pixels(name, err)) from None
    except UnidentifiedImageError as err:
        raise UserError(f"{name} is not an image PIL can read (JPEG, PNG, WebP, ...)") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {name}: {err}") from err


def parse_classes(text: str | list[str]) -> list[str]:
    """The class names of a prediction, from a comma-separated string or a list, checked."""
    names = parse_names(text) if isinstance(text, str) else [str(n).strip() for n in text if str(n).strip()]
    if not names:
        raise UserError("`classes` needs at least one class name, e.g. `classes` \"cat, sofa\"")
    if len(set(names)) != len(names):
        raise UserError("`classes` has a repeated name")
    return names


SLUG_CHARS = 64  # of a class name in a mask's file name: any name stays under every file system's limit


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:SLUG_CHARS].strip("_") or "class"


def _is_store(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "zarr.json").is_file()


@dataclass
class PredictionInputs:
    """Where a run's encoders and class embeddings come from at prediction time.

    The stores it was trained from when they are reachable (as configured, or by the absolute
    paths the run kept), else what the run itself keeps (``inputs.json``): encoder identities and
    the class embeddings it was trained with, new names encoded by the text encoder named there.
    """

    run: Path
    vision_store: str | None
    text_store: str | None
    kept: dict | None
    text_encoder: object = field(default=None, repr=False)  # built on the first name to encode, then kept

    @classmethod
    def of(cls, *, checkpoint: str | Path, config) -> PredictionInputs:
        path = Path(checkpoint)
        run = path if (path / "config.json").is_file() and path.parent.name != "checkpoints" else path.parent.parent
        kept = read_run_inputs(run)
        stores = []
        for configured, key in ((config.data.cache, "vision_store"), (config.data.text_store, "text_store")):
            found = next((p for p in (configured, (kept or {}).get(key)) if _is_store(p)), None)
            if found is None and kept is None:
                raise UserError(f"{run}: the store it was trained from ({configured}) is not reachable from here, and "
                                f"the run keeps no copy of its inputs (trained before runs kept inputs.json): predict "
                                f"from the folder it was trained in, or retrain it")
            stores.append(found)
        return cls(run=run, vision_store=stores[0], text_store=stores[1], kept=kept)

    def vision_identity(self) -> dict:
        if self.vision_store is not None:
            return store_attrs(open_store(self.vision_store))
        return self.kept["vision"]

    def class_vectors(self, names: list[str], *, device: str) -> np.ndarray:
        """[C, Dt]: from the text store when reachable, else the kept embeddings plus newly encoded names."""
        if self.text_store is not None:
            return class_embeddings(text_store=self.text_store, names=names, device=device,
                                    text_encoder=lambda: self._text(device))
        kept = self.kept["embeddings"]
        missing = [n for n in names if n not in kept]
        if missing:
            text = self._text(device).text
            kept = {**kept, **dict(zip(missing, text.encode_names([prompt_name(n) for n in missing]).cpu().numpy()))}
        return np.stack([kept[n] for n in names]).astype(np.float32)

    def _text(self, device: str):
        """The text encoder that made the class embeddings, built once per inputs object."""
        if self.text_encoder is None:
            self.text_encoder = (text_encoder_of(self.text_store, device=device) if self.text_store is not None
                                 else encoder_from_identity(self.kept["text"], vision=False, text=True, device=device))
        return self.text_encoder


def predict_photo(*, image: str | Path, classes: list[str], checkpoint: str | Path, out: str | Path,
                  device: str = "auto", resize: bool = False, stride: int | None = None, batch_size: int = 16,
                  quiet: bool = False, allow_mismatch: tuple[str, ...] = ()) -> dict:
    """``fusioner predict``: :func:`predict` on the resolved device, with the lines to print
    (``text``) and the notes for stderr (``notes``) added to its summary."""
    from pipeline.runtime import resolve_device

    names = parse_classes(classes)
    summary = predict(image=image, classes=names, checkpoint=checkpoint, out=out, device=str(resolve_device(device)),
                      resize=resize, stride=stride, batch_size=batch_size, quiet=quiet,
                      allow_mismatch=tuple(allow_mismatch))
    lines = [f"{name:>24s}  {100 * share:5.1f}% of pixels" for name, share in summary["coverage"].items()]
    lines.append(f"wrote {out}/overlay.png and {len(names)} masks")
    return {**summary, "text": "\n".join(lines), "notes": prediction_notes(pretrained=summary["pretrained_features"])}


def prediction_notes(*, pretrained: bool) -> list[str]:
    """What a person shown these masks must know: random-init features make them a pipeline check."""
    return [] if pretrained else ["note: random-init vision tower; the masks are a pipeline check, not a result"]


PREDICT_BATCH = 16  # windows encoded at once: bounds memory on large photos, still fills a GPU


def label_dtype(count: int) -> type:
    """uint8 label maps up to 255 classes (0 is background), uint16 beyond (up to 65535)."""
    if count > np.iinfo(np.uint16).max:
        raise UserError(f"predict takes at most {np.iinfo(np.uint16).max} class names, got {count}")
    return np.uint8 if count <= np.iinfo(np.uint8).max else np.uint16


class Predictor:
    """A trained run ready for photos: its model, its frozen vision tower and its class-name source,
    loaded once and used for any number of photos (``fusioner predict`` makes one for one photo,
    ``fusioner serve`` one for every request it answers). Not safe for two threads at once."""

    def __init__(self, *, checkpoint: str | Path, device: str = "cpu", encoders=None,
                 allow_mismatch: tuple[str, ...] = ()):
        from pipeline.training.checkpoints import load_model

        self.checkpoint, self.device = checkpoint, device
        self.model, self.config = load_model(checkpoint, device=device)
        self.source = PredictionInputs.of(checkpoint=checkpoint, config=self.config)
        self.attrs = self.source.vision_identity()
        # A reachable store that is not what the run was trained on is refused (unless allowed).
        check_stores(run=self.source.run, config=self.config, vision_store=self.source.vision_store,
                     text_store=self.source.text_store, split=None, allow=allow_mismatch)
        self.encoders = encoders if encoders is not None else encoder_from_identity(
            self.attrs, vision=True, text=False, device=device)
        normalization = (self.source.kept or {}).get("normalize") or (
            split_normalization(self.source.vision_store, self.config.data.split) if self.source.vision_store else None)
        if normalization:  # photos are normalised as the training views were
            self.encoders.vision.use_normalization(mean=normalization["mean"], std=normalization["std"])
        stats = normalization or {"mean": self.attrs["mean"], "std": self.attrs["std"]}
        self.fill = pad_fill(fill="released", mean=stats["mean"], std=stats["std"])  # normalises to -1, as released

    @property
    def pretrained(self) -> bool:
        """False for a run trained on random-init features: its masks are a pipeline check, not a result."""
        return bool(self.attrs["pretrained"])

    @torch.inference_mode()
    def predict(self, *, pixels: np.ndarray, name: str, classes: list[str], out: str | Path | None,
                resize: bool = False, stride: int | None = None, batch_size: int = PREDICT_BATCH,
                quiet: bool = True) -> dict:
        """:func:`predict` on decoded ``pixels`` ([H, W, 3] uint8) of the photo called ``name``."""
        if batch_size < 1:
            raise UserError(f"`batch_size` must be at least 1, got {batch_size}")
        dtype = label_dtype(len(classes))
        size = int(self.attrs["input_size"])
        height, width = pixels.shape[:2]
        boxes = [(0, 0, width, height)] if resize else window_boxes(
            height=height, width=width, size=size, stride=stride or max(1, (2 * size) // 3))
        text = torch.from_numpy(self.source.class_vectors(classes, device=self.device)).to(self.device)  # [C, Dt]
        logits = _window_logits(model=self.model, encoders=self.encoders, pixels=pixels, boxes=boxes, text=text,
                                size=size, grid=tuple(self.attrs["grid"]), batch_size=batch_size, quiet=quiet,
                                fill=self.fill)
        labels, probs = _label_map(self.model, logits, dtype=dtype)
        coverage = np.bincount(labels.ravel(), minlength=len(classes) + 1) / labels.size
        summary = {
            "image": name, "size": [height, width], "classes": classes, "views": len(boxes),
            "coverage": {n: float(share) for n, share in zip(classes, coverage[1:])},
            "checkpoint": str(self.checkpoint), "pretrained_features": self.pretrained,
        }
        if out is not None:
            summary.update(_write_prediction(out=Path(out), photo=name, pixels=pixels, labels=labels,
                                             classes=classes, pretrained=self.pretrained))
            (Path(out) / "prediction.json").write_text(json.dumps(summary, indent=2) + "\n")
        arrays = {"label_map": labels, "probabilities": probs.detach().float().cpu().numpy()}
        return {**summary, **arrays}


def predict(*, image: str | Path, classes: list[str], checkpoint: str | Path, out: str | Path | None,
            device: str = "cpu", resize: bool = False, stride: int | None = None,
            encoders=None, batch_size: int = PREDICT_BATCH, quiet: bool = True,
            allow_mismatch: tuple[str, ...] = ()) -> dict:
    """Segment ``image`` into ``classes``.

    Returns the JSON summary plus ``label_map`` ([H, W], 0 = background, j + 1 =
    ``classes[j]``; uint8, uint16 beyond 255 classes) and ``probabilities`` ([C, H, W]
    float32) as arrays. With ``out``, also writes one mask per class, the label map, an
    overlay and ``prediction.json`` there. A reachable store that differs from what the run
    was trained on is refused unless the difference is named in ``allow_mismatch``. Windows are
    encoded ``batch_size`` at a time and their logits added onto the full-size map as they come,
    so memory holds one batch of windows plus the output, however large the photo.
    """
    if batch_size < 1:
        raise UserError(f"`batch_size` must be at least 1, got {batch_size}")
    if stride is not None and stride < 1:
        raise UserError(f"`stride` must be at least 1 pixel, got {stride}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"`out` {out} is a file, not a folder for the masks; choose another `out`")
    label_dtype(len(classes))
    predictor = Predictor(checkpoint=checkpoint, device=device, encoders=encoders, allow_mismatch=allow_mismatch)
    return predictor.predict(pixels=read_photo(image), name=str(image), classes=classes, out=out, resize=resize,
                             stride=stride, batch_size=batch_size, quiet=quiet)


def _window_logits(*, model, encoders, pixels: np.ndarray, boxes: list, text: torch.Tensor, size: int,
                   grid: tuple, batch_size: int, quiet: bool, fill: tuple[int, int, int]) -> torch.Tensor:
    """[C, H, W] logits: windows rendered, encoded and decoded ``batch_size`` at a time, each
    batch's logits added onto the full-size map before the next batch is rendered."""
    height, width = pixels.shape[:2]
    stitcher = Stitcher(channels=text.shape[0], height=height, width=width, device=text.device)
    started = time.perf_counter()
    with progress(total=len(boxes), desc="predict", unit="window", quiet=quiet) as bar:
        for start in range(0, len(boxes), batch_size):
            batch = boxes[start:start + batch_size]
            views = np.stack([render_view(image=pixels, mask=None, params=ViewParams(box=b), size=size, fill=fill)[0]
                              for b in batch])
            tokens = encoders.vision.encode(views)  # [B, h*w, D]
            logits = model(tokens.to(text.device), text, grid=grid)  # [B, C, S, S]
            stitcher.add(logits, boxes=np.asarray(batch), flips=np.zeros(len(batch), bool))
            bar.update(len(batch))
            if start == 0 and not quiet and len(boxes) > len(batch):
                note = time_note(windows=len(boxes), done=len(batch), seconds=time.perf_counter() - started,
                                 size=size, shape=(height, width))
                if note:
                    print(note, file=sys.stderr)
    return stitcher.result()


LONG_PREDICTION_S = 120.0  # a prediction expected to take longer gets the faster options named


def time_note(*, windows: int, done: int, seconds: float, size: int, shape: tuple[int, int]) -> str | None:
    """After the first batch: how many windows, how long at the rate measured, and what is faster."""
    rate = done / max(seconds, 1e-9)
    left = (windows - done) / rate
    if left < LONG_PREDICTION_S:
        return None
    minutes = f"{left / 60:.0f} min" if left >= 60 else f"{left:.0f} s"
    return (f"note: {windows:,} windows of {size} px over {shape[1]}x{shape[0]} pixels: about {minutes} at "
            f"{rate:.1f} windows/s here; `resize` (one view of the whole photo) or a coarser `stride` "
            f"(default {max(1, (2 * size) // 3)} px) is much faster")


def _label_map(model, logits: torch.Tensor, *, dtype: type, rows: int = 256) -> tuple[np.ndarray, torch.Tensor]:
    """The model's mask rule on [C, H, W] logits, a band of rows at a time: the probabilities
    overwrite the logits in place, so a large photo holds one full-size map, not three."""
    height = logits.shape[1]
    labels = np.zeros(logits.shape[1:], dtype)
    for r0 in range(0, height, rows):
        band_labels, band_probs = model.predict_masks(logits[None, :, r0:r0 + rows])
        logits[:, r0:r0 + rows] = band_probs[0]
        labels[r0:r0 + rows] = band_labels[0].cpu().numpy()
    return labels, logits


def _write_prediction(*, out: Path, photo: str, pixels: np.ndarray, labels: np.ndarray, classes: list[str],
                      pretrained: bool) -> dict:
    """Masks, label map and overlay files; returns their names for the summary."""
    out.mkdir(parents=True, exist_ok=True)
    save_label_png(labels, out / "labels.png", caveat=not pretrained, names=classes)
    legend(names=classes, labels=labels, out=out / "legend.png", caveat=not pretrained)
    files, digits = {}, max(2, len(str(len(classes))))
    for j, name in enumerate(classes):
        path = out / f"mask_{j + 1:0{digits}d}_{_slug(name)}.png"
        Image.fromarray(((labels == j + 1) * 255).astype(np.uint8)).save(path, pnginfo=png_caveat(not pretrained))
        files[name] = path.name
    overlay(image=pixels, labels=labels, names=classes, out=out / "overlay.png", title=Path(photo).name,
            caveat=not pretrained)
    return {"masks": files, "overlay": "overlay.png", "labels": "labels.png", "legend": "legend.png"}
