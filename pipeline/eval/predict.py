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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.labels import parse_names
from pipeline.data.readers import rgb_array
from pipeline.data.views import ViewParams, render_view, stitch, window_boxes
from pipeline.encode.text import class_embeddings, encoder_of
from pipeline.errors import UserError
from pipeline.plots import overlay
from pipeline.store.layout import open_store, store_attrs


def read_photo(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return rgb_array(image)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from err


def parse_classes(text: str | list[str]) -> list[str]:
    """The class names of a prediction, from a comma-separated string or a list, checked."""
    names = parse_names(text) if isinstance(text, str) else [str(n).strip() for n in text if str(n).strip()]
    if not names:
        raise UserError("--classes needs at least one class name, e.g. --classes \"cat, sofa\"")
    if len(set(names)) != len(names):
        raise UserError("--classes has a repeated name")
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "class"


def predict_photo(*, image: str | Path, classes: list[str], checkpoint: str | Path, out: str | Path,
                  device: str = "auto", resize: bool = False) -> dict:
    """``fusioner predict``: :func:`predict` on the resolved device, with the lines to print
    (``text``) and the notes for stderr (``notes``) added to its summary."""
    from pipeline.runtime import resolve_device

    names = parse_classes(classes)
    summary = predict(image=image, classes=names, checkpoint=checkpoint, out=out, device=str(resolve_device(device)),
                      resize=resize)
    lines = [f"{name:>24s}  {100 * share:5.1f}% of pixels" for name, share in summary["coverage"].items()]
    lines.append(f"wrote {out}/overlay.png and {len(names)} masks")
    notes = [] if summary["pretrained_features"] else [
        "note: random-init vision tower; the masks are a pipeline check, not a result"]
    return {**summary, "text": "\n".join(lines), "notes": notes}


@torch.inference_mode()
def predict(*, image: str | Path, classes: list[str], checkpoint: str | Path, out: str | Path | None,
            device: str = "cpu", resize: bool = False, stride: int | None = None,
            encoders=None) -> dict:
    """Segment ``image`` into ``classes``.

    Returns the JSON summary plus ``label_map`` ([H, W], 0 = background, j + 1 =
    ``classes[j]``) and ``probabilities`` ([C, H, W] float32) as arrays. With
    ``out``, also writes one mask per class, the label map, an overlay and
    ``prediction.json`` there.
    """
    from pipeline.training.checkpoints import load_model

    model, config = load_model(checkpoint, device=device)
    vision_store = config.data.cache
    text_store = config.data.text_store
    attrs = store_attrs(open_store(vision_store))
    size = int(attrs["input_size"])
    pixels = read_photo(image)
    height, width = pixels.shape[:2]
    if encoders is None:
        encoders = encoder_of(vision_store, vision=True, text=False, device=device)
    boxes = [(0, 0, width, height)] if resize else window_boxes(
        height=height, width=width, size=size, stride=stride or max(1, (2 * size) // 3))
    views = np.stack([render_view(image=pixels, mask=None, params=ViewParams(box=b), size=size)[0] for b in boxes])
    tokens = encoders.vision.encode(views)  # [V, h*w, D]
    text = torch.from_numpy(class_embeddings(text_store=text_store, names=classes, device=device))  # [C, Dt]
    logits = model(tokens.to(device), text.to(device), grid=tuple(attrs["grid"]))  # [V, C, S, S]
    full = stitch(logits, boxes=np.asarray(boxes), flips=np.zeros(len(boxes), bool), height=height, width=width)
    labels, probs = model.predict_masks(full[None])  # [1, H, W], [1, C, H, W]
    labels = labels[0].cpu().numpy().astype(np.uint8)
    pretrained = bool(attrs["pretrained"])
    summary = {
        "image": str(image), "size": [height, width], "classes": classes, "views": len(boxes),
        "coverage": {n: float((labels == j + 1).mean()) for j, n in enumerate(classes)},
        "checkpoint": str(checkpoint), "pretrained_features": pretrained,
    }
    if out is not None:
        summary.update(_write_prediction(out=Path(out), image=image, pixels=pixels, labels=labels, classes=classes,
                                         pretrained=pretrained))
        (Path(out) / "prediction.json").write_text(json.dumps(summary, indent=2) + "\n")
    arrays = {"label_map": labels, "probabilities": probs[0].detach().float().cpu().numpy()}
    return {**summary, **arrays}


def _write_prediction(*, out: Path, image, pixels: np.ndarray, labels: np.ndarray, classes: list[str],
                      pretrained: bool) -> dict:
    """Masks, label map and overlay files; returns their names for the summary."""
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(out / "labels.png")
    files = {}
    for j, name in enumerate(classes):
        path = out / f"mask_{j + 1:02d}_{_slug(name)}.png"
        Image.fromarray(((labels == j + 1) * 255).astype(np.uint8)).save(path)
        files[name] = path.name
    title = f"{Path(image).name}" + ("" if pretrained else "  [random-init vision tower: pipeline check]")
    overlay(image=pixels, labels=labels, names=classes, out=out / "overlay.png", title=title)
    return {"masks": files, "overlay": "overlay.png", "labels": "labels.png"}
