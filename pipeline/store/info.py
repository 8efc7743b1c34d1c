"""What `fusioner info` says about a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store.layout import has_text, open_store, read_text, store_attrs
from pipeline.store.splits import done_shards, list_splits, read_whole


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_store(path: str | Path) -> dict:
    """Counts, sizes and attributes for ``fusioner info``."""
    path = Path(path)
    root = open_store(path)
    attrs = store_attrs(root)
    info = {"path": str(path), **attrs, "bytes": _dir_size(path), "splits": {}}
    if has_text(root):
        names, emb = read_text(root)
        info["text"] = {"classes": len(names), "dim": int(emb.shape[1]),
                        "encoder": root["text"].attrs.get("encoder"),
                        "templates": len(root["text"].attrs.get("templates", []))}
    for split in list_splits(root):
        group = root[split]
        done = done_shards(group)
        valid = read_whole(group, "view_valid")
        feats = group["features"]
        info["splits"][split] = {
            "kind": group.attrs["kind"],
            "images": int(group.attrs["num_images"]),
            "views": int(group.attrs["num_views"]),
            "shards_done": f"{int(done.sum())}/{done.size}",
            "complete": bool(done.all()),
            "skipped_views": int((~valid).sum()) if done.all() else None,
            "features": f"{list(feats.shape)} {feats.dtype}",
            "bytes": _dir_size(path / split),
            "bytes_per_view": _dir_size(path / split) // max(int(group.attrs["num_views"]), 1),
            "classes": len(group.attrs["class_names"]),
            "skipped": group.attrs.get("skipped", []),
        }
    return info


def format_store(data: dict) -> str:
    """:func:`describe_store`'s dict as the lines ``fusioner info`` prints."""
    weights = data["weights"]
    lines = [f"store      {data['path']}  (format {data['format_version']}, {data['bytes'] / 2**20:.1f} MiB)",
             f"encoder    {data['encoder']}  weights: {weights['source']}"
             + ("" if weights["pretrained"] else "  [random-init: not a result]")]
    if weights.get("sha256"):
        lines.append(f"sha256     {weights['sha256']}")
    if data["grid"]:
        lines.append(f"input      {data['input_size']} px, grid {data['grid']}, vision dim {data['vision_dim']}, "
                     f"text dim {data['text_dim']}")
        lines.append(f"mean/std   {data['mean']} / {data['std']}")
    else:
        lines.append(f"text only  dim {data['text_dim']}")
    lines.append(f"created    {data['created']}  versions: "
                 + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()))
    if "text" in data:
        t = data["text"]
        lines.append(f"text       {t['classes']} classes x {t['dim']} ({t['templates']} prompt templates)")
    for name, split in data["splits"].items():
        state = "" if split["complete"] else " (incomplete: re-run extract to resume)"
        lines.append(f"split      {name}: {split['kind']}, {split['images']} images, {split['views']} views, "
                     f"shards {split['shards_done']}{state}, {split['bytes'] / 2**20:.1f} MiB "
                     f"({split['bytes_per_view']} B/view), features {split['features']}")
        if split["skipped"]:
            lines.append(f"           skipped {len(split['skipped'])} bad image(s): "
                         + ", ".join(s[0] for s in split["skipped"][:5]))
    return "\n".join(lines)
