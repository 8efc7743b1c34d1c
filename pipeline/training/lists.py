"""Training pairs restricted to a protocol's standard lists (PASCAL trn/fold*.txt, COCO trn/fold{i}.json).

The released recipe trains on exactly the (image, class) pairs of those lists
(COCO-20i fold 0: 95,476 pairs over 62,040 images); without them every seen
class present in a cached view makes a sample. With ``data.train_lists`` the
samples are the listed pairs themselves, so the steps of an epoch are the
released code's for every K, and a listed image the cache lacks is an error
(the lists were made for another extraction).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.protocols import load_training_pairs, protocol_entry
from pipeline.errors import UserError


def listed_samples(*, split, protocol: str, fold: int, splits_dir: str | Path,
                   classes_per_sample: str) -> list[tuple[int, tuple[int, ...]]]:
    """(image, classes) samples: exactly the standard lists' (image, class) pairs, whatever the K views show.

    As in the released recipe an epoch is one pass over the listed pairs; a view whose
    crop lost the listed class trains on an empty target, as a fresh crop would there.
    With ``classes_per_sample="all"`` an image's listed classes make one sample.
    """
    trained_on = protocol_entry(protocol).train_protocol or protocol
    listed = load_training_pairs(protocol=trained_on, fold=fold, splits_dir=Path(splits_dir))
    index = {image_id: n for n, image_id in enumerate(split.image_ids)}
    with_views = set(int(i) for i in split.view_image[split.view_valid])
    missing = sorted({e.image_id for e in listed if index.get(e.image_id) not in with_views})
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {trained_on} fold-{fold} training lists in {splits_dir} "
                        f"are not in {split.path} {split.split} (first: {missing[0]}); extract the split they list")
    if not listed:
        raise UserError(f"{splits_dir}: the {trained_on} fold-{fold} training lists are empty")
    by_image: dict[int, set[int]] = {}
    for episode in listed:
        by_image.setdefault(index[episode.image_id], set()).add(int(episode.class_value))
    if classes_per_sample == "all":
        return [(image, tuple(sorted(classes))) for image, classes in sorted(by_image.items())]
    return [(image, (c,)) for image, classes in sorted(by_image.items()) for c in sorted(classes)]
