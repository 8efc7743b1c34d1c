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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.labels import parse_names, prompt_name
from pipeline.data.readers import rgb_array
from pipeline.data.views import ViewParams, render_view, stitch, window_boxes
from pipeline.encode.text import class_embeddings, encoder_from_identity
from pipeline.errors import UserError
from pipeline.plots import overlay, save_label_png
from pipeline.store.layout import open_store, store_attrs
from pipeline.training.inputs import read_run_inputs


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


def _training_normalization(store: str, split: str | None) -> dict | None:
    """The mean/std the training split was extracted with (None for stores that predate the record)."""
    from pipeline.data.labels import TRAIN_SPLITS
    from pipeline.store.splits import list_splits

    root = open_store(store)
    names = [split] if split else [s for s in list_splits(root) if s.split("/")[-1] in TRAIN_SPLITS][:1]
    return dict(root[names[0]].attrs["meta"]).get("normalize") if names else None


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
            return class_embeddings(text_store=self.text_store, names=names, device=device)
        kept = self.kept["embeddings"]
        missing = [n for n in names if n not in kept]
        if missing:
            text = encoder_from_identity(self.kept["text"], vision=False, text=True, device=device).text
            kept = {**kept, **dict(zip(missing, text.encode_names([prompt_name(n) for n in missing]).cpu().numpy()))}
        return np.stack([kept[n] for n in names]).astype(np.float32)


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
    source = PredictionInputs.of(checkpoint=checkpoint, config=config)
    attrs = source.vision_identity()
    size = int(attrs["input_size"])
    pixels = read_photo(image)
    height, width = pixels.shape[:2]
    if encoders is None:
        encoders = encoder_from_identity(attrs, vision=True, text=False, device=device)
    normalization = _training_normalization(source.vision_store, config.data.split) if source.vision_store else None
    if normalization:  # photos are normalised as the training views were
        encoders.vision.use_normalization(mean=normalization["mean"], std=normalization["std"])
    boxes = [(0, 0, width, height)] if resize else window_boxes(
        height=height, width=width, size=size, stride=stride or max(1, (2 * size) // 3))
    views = np.stack([render_view(image=pixels, mask=None, params=ViewParams(box=b), size=size)[0] for b in boxes])
    tokens = encoders.vision.encode(views)  # [V, h*w, D]
    text = torch.from_numpy(source.class_vectors(classes, device=device))  # [C, Dt]
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
    save_label_png(labels, out / "labels.png")
    files = {}
    for j, name in enumerate(classes):
        path = out / f"mask_{j + 1:02d}_{_slug(name)}.png"
        Image.fromarray(((labels == j + 1) * 255).astype(np.uint8)).save(path)
        files[name] = path.name
    title = f"{Path(image).name}" + ("" if pretrained else "  [random-init vision tower: pipeline check]")
    overlay(image=pixels, labels=labels, names=classes, out=out / "overlay.png", title=title)
    return {"masks": files, "overlay": "overlay.png", "labels": "labels.png"}
