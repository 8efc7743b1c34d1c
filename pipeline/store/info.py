"""What `fusioner info` says about a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store.layout import has_text, open_store, read_text, store_attrs
from pipeline.store.splits import done_shards, list_splits


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
        valid = np.asarray(group["view_valid"][:])
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
