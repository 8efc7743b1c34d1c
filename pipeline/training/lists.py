"""Training pairs restricted to a protocol's standard lists (PASCAL trn/fold*.txt, COCO trn/fold{i}.json).

The released recipe trains on exactly the (image, class) pairs of those lists
(COCO-20i fold 0: 95,476 pairs over 62,040 images); without them every seen
class present in a cached view makes a sample. With ``data.train_lists``, a
sample keeps only the classes its image is listed with, and a listed image the
cache lacks is an error (the lists were made for another extraction).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.protocols import load_training_pairs, protocol_entry
from pipeline.errors import UserError


def restrict_to_lists(*, samples: list[tuple[int, tuple[int, ...]]], split, protocol: str, fold: int,
                      splits_dir: str | Path) -> list[tuple[int, tuple[int, ...]]]:
    """(view, classes) samples -> those whose (image, class) pairs the standard training lists hold."""
    trained_on = protocol_entry(protocol).train_protocol or protocol
    listed = {(e.image_id, e.class_value) for e in
              load_training_pairs(protocol=trained_on, fold=fold, splits_dir=Path(splits_dir))}
    cached = set(split.image_ids)
    missing = sorted({image for image, _ in listed} - cached)
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {trained_on} fold-{fold} training lists in {splits_dir} "
                        f"are not in {split.path} {split.split} (first: {missing[0]}); extract the split they list")
    kept = []
    for view, classes in samples:
        image_id = split.image_ids[int(split.view_image[view])]
        chosen = tuple(c for c in classes if (image_id, c) in listed)
        if chosen:
            kept.append((view, chosen))
    if not kept:
        raise UserError(f"no cached training view shows a listed (image, class) pair of {splits_dir}")
    return kept
