"""Zero-shot protocols: which classes are novel in each fold, and which (image, class) pairs are evaluated.

Class values are always 1-based positions in the protocol's ``class_names``,
which equal the reader's class list (``Protocol.check_dataset`` enforces it), so
a fold's ``novel`` tuple can be compared with mask values directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data.labels import IGNORE
from pipeline.data.labels import COCO_CLASSES, VOC_CLASSES
from pipeline.data.mosaic import read_mosaic_index
from pipeline.data.readers import BadRecordError, SegDataset, read_lines
from pipeline.data.registry import list_datasets, reader_layouts
from pipeline.errors import UserError

COCO_STANDARD_EPISODES = 1000  # the COCO-20i protocol scores the first 1000 episodes of the sorted list
SMALL_OBJECT_PIXELS = 2 * 32 * 32  # OSLSM/PFENet rule: a class must cover about two 32x32 cells


@dataclass(frozen=True)
class Fold:
    protocol: str
    fold: int
    novel: tuple[int, ...]  # 1-based class values never seen in training, scored at test time
    seen: tuple[int, ...]


@dataclass(frozen=True)
class Episode:
    """One evaluation pair: an image and one novel class present in it."""

    image_id: str
    class_value: int


@dataclass(frozen=True)
class Protocol:
    name: str
    class_names: tuple[str, ...]
    folds: tuple[Fold, ...]
    episodes: str  # where the evaluation pairs come from, in words
    train_protocol: str = ""  # coco2voc trains on COCO-20i fold i and evaluates on VOC

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    def fold(self, i: int) -> Fold:
        if not 0 <= i < self.num_folds:
            raise UserError(f"protocol {self.name!r} has folds 0..{self.num_folds - 1}, not {i}")
        return self.folds[i]

    def check_dataset(self, dataset: SegDataset) -> None:
        """Fold values index the class list, so a reader with another list would score the wrong classes."""
        if tuple(dataset.class_names) != self.class_names:
            raise UserError(f"{dataset.root}: the {dataset.name} reader's {len(dataset.class_names)} classes "
                            f"differ from protocol {self.name!r}'s {len(self.class_names)} classes")

    def describe(self) -> dict:
        return {"protocol": self.name, "folds": self.num_folds, "classes": len(self.class_names),
                "class_names": list(self.class_names), "episodes": self.episodes,
                "train_protocol": self.train_protocol or None,
                "novel": {f.fold: [self.class_names[v - 1] for v in f.novel] for f in self.folds}}


def _folds(name: str, n_classes: int, novel_sets: list[set[int]]) -> tuple[Fold, ...]:
    every = range(1, n_classes + 1)
    return tuple(Fold(name, i, tuple(sorted(novel)), tuple(v for v in every if v not in novel))
                 for i, novel in enumerate(novel_sets))


def _pascal5i() -> Protocol:
    """Fold i holds VOC classes 5i+1..5i+5 (contiguous blocks)."""
    novel = [set(range(5 * i + 1, 5 * i + 6)) for i in range(4)]
    return Protocol("pascal5i", VOC_CLASSES, _folds("pascal5i", 20, novel), "splits/pascal/val/fold{i}.txt")


def _coco20i() -> Protocol:
    """Fold i holds the 0-based COCO indices k with k % 4 == i (interleaved, paper Table 6)."""
    novel = [{k + 1 for k in range(80) if k % 4 == i} for i in range(4)]
    return Protocol("coco20i", COCO_CLASSES, _folds("coco20i", 80, novel),
                    f"splits/coco/val/fold{{i}}.json, first {COCO_STANDARD_EPISODES} of the sorted pairs")


# Both split files use the same fused names for the 20 shared classes ("tvmonitor",
# "diningtable", "motorbike", "aeroplane", "sofa", "pottedplant"), so the official
# COCO names (tv, dining table, motorcycle, airplane, couch, potted plant) map through
# pipeline.datasets.coco_class_name and VOC -> COCO is the identity on names.
VOC_TO_COCO = {name: COCO_CLASSES.index(name) + 1 for name in VOC_CLASSES}


def _coco2voc() -> Protocol:
    """Train on COCO-20i fold i; score the VOC classes whose COCO class is novel in fold i.

    The other VOC classes were seen (as COCO classes) in training, so they are
    left out of the zero-shot score and listed as ``seen``.
    """
    novel = [{v for v, name in enumerate(VOC_CLASSES, 1) if (VOC_TO_COCO[name] - 1) % 4 == i} for i in range(4)]
    return Protocol("coco2voc", VOC_CLASSES, _folds("coco2voc", 20, novel),
                    "pairs of splits/pascal/val/fold*.txt whose class is novel for COCO-20i fold i",
                    train_protocol="coco20i")


def _single_fold(name: str, class_names: list[str], episodes: str) -> Protocol:
    return Protocol(name, tuple(class_names), _folds(name, len(class_names), [set(range(1, len(class_names) + 1))]),
                    episodes)


def _fss(*, splits_dir: str | Path | None = None, classes_file: str | Path | None = None) -> Protocol:
    """FSS-1000 one-way binary evaluation over the 240 test classes (one fold, all novel)."""
    if not (splits_dir or classes_file):
        raise UserError("protocol 'fss' needs splits_dir (reads fss/test.txt) or classes_file")
    path = Path(classes_file) if classes_file else Path(splits_dir) / "fss" / "test.txt"
    return _single_fold("fss", read_lines(path, what="fss class list"), "every image of every test class")


def _mosaic4(*, root: str | Path) -> Protocol:
    """Mosaic-4 composites: one fold, all classes novel, |W| = 4 names per image."""
    return _single_fold("mosaic4", read_lines(Path(root) / "classes.txt", what="mosaic class list"),
                        "each composite with each of its 4 classes (mosaic4.json)")


def _custom(*, class_names: list[str], novel: list[str]) -> Protocol:
    """A user's own class list and novel classes, named rather than numbered."""
    unknown = [n for n in novel if n not in class_names]
    if unknown:
        raise UserError(f"custom protocol: novel class {unknown[0]!r} is not in class_names")
    values = {class_names.index(n) + 1 for n in novel}
    return Protocol("custom", tuple(class_names), _folds("custom", len(class_names), [values]),
                    "derived from masks (derive_episodes)")




def _pascal_pairs(path: Path) -> list[Episode]:
    """Lines `IMAGEID__CC` with CC the 1-based VOC class."""
    episodes = []
    for number, line in enumerate(read_lines(path, what="episode list"), start=1):
        image_id, _, value = line.rpartition("__")
        if not image_id or not value.isdigit() or not 1 <= int(value) <= len(VOC_CLASSES):
            raise UserError(f"{path}: line {number} {line!r} is not IMAGEID__CC with CC in 01..20")
        episodes.append(Episode(image_id, int(value)))
    return episodes


def _coco_pairs(path: Path, fold: int | None) -> list[Episode]:
    """{class key: [image paths]} -> pairs sorted by (image path, class), as the official recipe orders them.

    Keys are 0-based *global* COCO-20i indices as strings: fold i's file has the
    keys k with k % 4 == i ("0", "4", ..., "76" for fold 0), so mask value = k + 1.
    """
    if not path.is_file():
        raise UserError(f"{path}: episode list not found")
    try:
        listing = {int(k): v for k, v in json.loads(path.read_text()).items()}
        pairs = sorted({(str(image), k) for k, images in listing.items() for image in images})
    except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as error:
        raise UserError(f"{path}: not a {{class index: [image paths]}} json ({error})") from None
    if fold is not None and any(k % 4 != fold for k in listing):
        raise UserError(f"{path}: keys are not the COCO-20i fold-{fold} classes (k % 4 == {fold})")
    return [Episode(file_stem(image), k + 1) for image, k in pairs]


def file_stem(path: str) -> str:
    """``Path(path).stem`` without building a Path: a COCO-20i fold lists about 100,000 images."""
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def _pascal_val(splits_dir: Path, fold: int, dataset: SegDataset | None) -> tuple[Path, list[Episode]]:
    source = splits_dir / "pascal" / "val" / f"fold{fold}.txt"
    return source, _pascal_pairs(source)


def _coco_val(splits_dir: Path, fold: int, dataset: SegDataset | None) -> tuple[Path, list[Episode]]:
    source = splits_dir / "coco" / "val" / f"fold{fold}.json"
    return source, _coco_pairs(source, fold)


def _coco2voc_val(splits_dir: Path, fold: int, dataset: SegDataset | None) -> tuple[Path, list[Episode]]:
    """All PASCAL val pairs (the four fold lists together) whose class is novel for COCO-20i fold ``fold``."""
    source, novel = splits_dir / "pascal" / "val", set(create_protocol("coco2voc").fold(fold).novel)
    pairs = [e for i in range(4) for e in _pascal_pairs(source / f"fold{i}.txt") if e.class_value in novel]
    return source, sorted(pairs, key=lambda e: (e.image_id, e.class_value))


def _fss_test(splits_dir: Path, fold: int, dataset: SegDataset | None) -> tuple[Path, list[Episode]]:
    """The test list names classes only, so the images come from the reader (class order, then number)."""
    if dataset is None or not hasattr(dataset, "image_class"):
        raise UserError("fss episodes come from the images on disk: pass dataset= (an fss reader)")
    create_protocol("fss", splits_dir=splits_dir).check_dataset(dataset)
    return splits_dir / "fss" / "test.txt", [Episode(id_, dataset.image_class(i)) for i, id_ in enumerate(dataset.ids)]


def _mosaic_index(splits_dir: Path, fold: int, dataset: SegDataset | None) -> tuple[Path, list[Episode]]:
    """A make-mosaic output folder is its own splits_dir: each composite with each of its 4 tile classes."""
    source = splits_dir / "mosaic4.json"
    return source, [Episode(c["image_id"], t["value"]) for c in read_mosaic_index(source) for t in c["tiles"]]


def _pascal_trn(splits_dir: Path, fold: int) -> list[Episode]:
    """The trn lists of the three other folds (each lists its own classes)."""
    trn = splits_dir / "pascal" / "trn"
    return [e for j in range(4) if j != fold for e in _pascal_pairs(trn / f"fold{j}.txt")]


def _coco_trn(splits_dir: Path, fold: int) -> list[Episode]:
    """trn/fold{i}.json already holds the 60 seen classes of fold i."""
    path = splits_dir / "coco" / "trn" / f"fold{fold}.json"
    episodes = _coco_pairs(path, None)
    seen = set(create_protocol("coco20i").fold(fold).seen)
    if any(e.class_value not in seen for e in episodes):
        raise UserError(f"{path}: lists a class that is novel in fold {fold}")
    return episodes


@dataclass(frozen=True)
class ProtocolEntry:
    """A protocol's behaviour as data: callers read these fields and never compare protocol names."""

    build: Callable[..., Protocol]
    folds: int = 1  # known without building (fss/mosaic4/custom need options to build)
    episode_list: Callable | None = None  # (splits_dir, fold, dataset) -> (source, episodes); None: derive
    standard_limit: int | None = None  # the protocol scores only the first N episodes (COCO-20i: 1000)
    training_list: Callable | None = None  # (splits_dir, fold) -> the standard (image, seen class) pairs
    multiclass: bool = False  # each image is scored with all its classes at once (|W| > 1)
    named_novel: bool = False  # the novel classes are given by name (data.novel)
    train_on_own_classes: bool = False  # training composites whose every class is seen (Mosaic-4 training)
    train_protocol: str = ""  # trained on another protocol's data and folds (coco2voc: coco20i)


_PROTOCOLS: dict[str, ProtocolEntry] = {
    "pascal5i": ProtocolEntry(_pascal5i, folds=4, episode_list=_pascal_val, training_list=_pascal_trn),
    "coco20i": ProtocolEntry(_coco20i, folds=4, episode_list=_coco_val, standard_limit=COCO_STANDARD_EPISODES,
                             training_list=_coco_trn),
    "coco2voc": ProtocolEntry(_coco2voc, folds=4, episode_list=_coco2voc_val, train_protocol="coco20i"),
    "fss": ProtocolEntry(_fss, episode_list=_fss_test),
    "mosaic4": ProtocolEntry(_mosaic4, episode_list=_mosaic_index, multiclass=True, train_on_own_classes=True),
    "custom": ProtocolEntry(_custom, named_novel=True),
}


def list_protocols() -> list[str]:
    return sorted(_PROTOCOLS)


def protocol_entry(name: str) -> ProtocolEntry:
    if name not in _PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; known: {', '.join(list_protocols())}")
    return _PROTOCOLS[name]


def create_protocol(name: str, **options) -> Protocol:
    entry = protocol_entry(name)
    try:
        return entry.build(**options)
    except TypeError as error:  # a missing or unexpected option of the builder
        raise UserError(f"protocol {name!r}: {error}") from None


def resolve_fold(*, protocol: str, fold: int, novel: list[str] | tuple[str, ...] | None,
                 class_names: list[str]) -> Fold:
    """Fold ``fold`` of ``protocol`` for a store with ``class_names``, refusing a mismatched one.

    ``novel`` names the held-out classes of the protocols that take them (``custom``).
    """
    entry = protocol_entry(protocol)
    if entry.named_novel:
        if not novel:
            raise UserError(f"protocol '{protocol}' needs data.novel (the held-out class names)")
        made = create_protocol(protocol, class_names=class_names, novel=list(novel))
    elif entry.train_on_own_classes:
        # Training composites (Mosaic-4 from FSS-1000's training classes): every class of the
        # training split is seen; the test composites' classes are another list altogether.
        if fold != 0:
            raise UserError(f"protocol '{protocol}' has one fold (0), not {fold}")
        return Fold(protocol, 0, (), tuple(range(1, len(class_names) + 1)))
    else:
        made = create_protocol(protocol)
        if made.train_protocol:
            made = create_protocol(made.train_protocol)
        if list(made.class_names) != list(class_names):
            raise UserError(f"protocol '{protocol}' classes do not match the store's "
                            f"({len(made.class_names)} vs {len(class_names)} classes); "
                            f"use protocol 'custom' with data.novel for other data")
    if not 0 <= fold < made.num_folds:
        raise UserError(f"protocol '{protocol}' has folds 0..{made.num_folds - 1}, not {fold}")
    return made.fold(fold)


def check_fold(protocol: str, fold: int) -> None:
    folds = protocol_entry(protocol).folds
    if folds == 1 and fold != 0:
        raise UserError(f"protocol {protocol!r} has one fold (0), not {fold}")
    if not 0 <= fold < folds:
        raise UserError(f"protocol {protocol!r} has folds 0..{folds - 1}, not {fold}")



def load_episodes(*, protocol: str, fold: int, splits_dir: Path, limit: int | None = None,
                  dataset: SegDataset | None = None) -> list[Episode]:
    """The standard evaluation pairs of a protocol fold, in the order they are scored.

    Orders: pascal5i and coco2voc keep the sorted (image id, class) order of the
    pascal lists; coco20i sorts its (image path, class) pairs like the official
    recipe and keeps the first 1000 (``limit=None``; an explicit ``limit``
    replaces that); fss follows the reader; mosaic4 follows mosaic4.json. With
    ``dataset``, every listed image must exist in it.
    """
    entry = protocol_entry(protocol)
    if entry.episode_list is None:
        known = ", ".join(n for n in list_protocols() if _PROTOCOLS[n].episode_list)
        raise UserError(f"protocol {protocol!r} has no episode lists (those with lists: {known}); "
                        "use derive_episodes on its dataset")
    check_fold(protocol, fold)
    source, episodes = entry.episode_list(Path(splits_dir), fold, dataset)
    limit = limit or entry.standard_limit
    episodes = episodes[:limit] if limit else episodes
    if dataset is not None:
        _check_images(episodes, dataset, source)
    return episodes


def load_training_pairs(*, protocol: str, fold: int, splits_dir: Path) -> list[Episode]:
    """The official (image, seen class) training pairs for test fold ``fold`` (the entry's training_list)."""
    entry = protocol_entry(protocol)
    if entry.training_list is None:
        raise UserError(f"protocol {protocol!r} has no training lists: use seen_training_indices")
    check_fold(protocol, fold)
    return entry.training_list(Path(splits_dir), fold)


def _check_images(episodes: list[Episode], dataset: SegDataset, source: Path) -> None:
    known = set(dataset.ids)
    missing = sorted({e.image_id for e in episodes} - known)
    if missing:
        raise UserError(f"{source}: {len(missing)} listed images are not in {dataset.root} (first: {missing[0]})")


def derive_episodes(*, dataset: SegDataset, fold: Fold, min_pixels: int = SMALL_OBJECT_PIXELS) -> list[Episode]:
    """Episodes from masks when no list exists: every novel class covering at least ``min_pixels``.

    The threshold is the OSLSM/PFENet small-object rule (2 x 32 x 32 pixels);
    pass ``min_pixels=1`` for every class present. Order: dataset order, then
    class value, i.e. the sorted order of the shipped lists.
    """
    episodes = []
    for index, image_id in enumerate(dataset.ids):
        try:
            counts = dataset.class_pixels(index)
        except BadRecordError as error:
            dataset.record_bad(index, error)
            continue
        episodes += [Episode(image_id, v) for v in fold.novel if counts.get(v, 0) >= min_pixels]
    return episodes


def seen_training_indices(*, dataset: SegDataset, fold: Fold) -> list[int]:
    """Images that teach something: at least one seen class present (novel pixels get masked later)."""
    seen, indices = set(fold.seen), []
    for index in range(len(dataset)):
        try:
            present = dataset.classes_present(index)
        except BadRecordError as error:
            dataset.record_bad(index, error)
            continue
        if seen.intersection(present):
            indices.append(index)
    return indices


def training_mask(mask: np.ndarray, *, fold: Fold, novel_pixels: str = "background") -> np.ndarray:
    """Hide novel classes from training: as background (the official recipe) or as ignore."""
    fill = {"background": 0, "ignore": IGNORE}.get(novel_pixels)
    if fill is None:
        raise UserError(f"novel_pixels must be 'background' or 'ignore', got {novel_pixels!r}")
    out = mask.copy()
    out[np.isin(mask, fold.novel)] = fill
    return out


def describe_all() -> str:
    """What `fusioner datasets` prints: readers with their layouts, protocols with folds and class counts."""
    lines = ["Readers (name: layout expected under the root):"]
    lines += [f"  {name:8s} {layout}" for name, layout in reader_layouts().items()]
    lines.append("Protocols (name: folds, classes, episode source):")
    for name in (n for n in _PROTOCOLS if _PROTOCOLS[n].folds > 1):  # buildable without options
        spec = create_protocol(name)
        sizes = "/".join(str(len(f.novel)) for f in spec.folds)
        train = f", trained on {spec.train_protocol}" if spec.train_protocol else ""
        lines.append(f"  {name:8s} {spec.num_folds} folds over {len(spec.class_names)} classes, "
                     f"novel per fold {sizes}{train}; episodes: {spec.episodes}")
    lines += ["  fss      1 fold, the 240 FSS-1000 test classes of splits/fss/test.txt (option splits_dir)",
              "  mosaic4  1 fold, the classes of a make-mosaic output, 4 per image (option root)",
              "  custom   1 fold, options class_names=[...] and novel=[...] (names)",
              f"Readers known: {', '.join(list_datasets())}; protocols known: {', '.join(list_protocols())}"]
    return "\n".join(lines)
