"""Online mode: the released code's way, beside the cache.

Every step decodes its images, draws a fresh augmentation of each (image,
class) sample (:mod:`pipeline.data.augment`, seeded by (seed, image, epoch and
sample), so a resumed run sees the same pixels), runs the frozen vision
encoder on them, and hands the tokens to the very same training step, model,
config and checkpoints as cached training. Decoding and augmenting happen in
DataLoader worker processes; the encoder runs in the training process under
``inference_mode`` (half-precision autocast on GPU, as extraction does), and
its tokens are rounded to float16 like cached ones.

An epoch is one pass over the (image, class) pairs, as in cached training, so
the schedule of a run is the same in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.augment import AugmentConfig, augment_view, resolve_augment
from pipeline.data.labels import prompt_name
from pipeline.data.protocols import resolve_fold
from pipeline.data.registry import create_dataset
from pipeline.encode.families import create_encoder
from pipeline.encode.text import class_embeddings
from pipeline.errors import UserError, setting
from pipeline.runtime import resolve_device
from pipeline.training.batches import Batch, binary_targets
from pipeline.training.sources import BatchSource, TrainingData
from pipeline.training.config import TrainConfig


@dataclass
class OnlineSource:
    """What the loop reads from a cached split, for the online path."""

    path: str
    grid: tuple[int, int]
    input_size: int
    pretrained: bool
    class_names: list[str]  # the dataset's, as a cached split's (mask value k = entry k - 1)
    encoder: str = ""  # the encoder's registry name


class FreshViews(Dataset):
    """Item (epoch, sample) -> a freshly augmented view of the sample's image, its mask, its classes."""

    def __init__(self, *, dataset, samples: list, augment: AugmentConfig, size: int, seed: int):
        self.dataset, self.samples, self.augment, self.size, self.seed = dataset, samples, augment, size, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, classes = self.samples[index]
        record = self.dataset.load(image)
        view, mask = augment_view(image=record.image, mask=record.mask, config=self.augment, size=self.size,
                                  seed=self.seed, image_index=image, view_index=epoch * len(self.samples) + index)
        return view, mask, classes, index


class EpochOrder(Sampler):
    """Batches of (epoch, sample) keys in an order that depends only on (seed, epoch); set ``epoch``/``skip`` first."""

    def __init__(self, *, count: int, batch_size: int, seed: int):
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return max(0, -(-self.count // self.batch_size) - self.skip)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        for begin in range(self.skip * self.batch_size, self.count, self.batch_size):
            yield [(self.epoch, int(i)) for i in order[begin:begin + self.batch_size]]


def collate(items):
    views, masks, classes, index = zip(*items)
    return np.stack(views), np.stack(masks), list(classes), np.asarray(index)


def _quiet_worker(_: int) -> None:
    """Worker processes decode and augment on one thread each: the cores belong to the workers."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _online_samples(dataset, seen: tuple[int, ...], classes_per_sample: str) -> list[tuple[int, tuple[int, ...]]]:
    """(image, classes) pairs over the images that show a seen class, as the cached path counts them."""
    wanted, samples = set(seen), []
    for index in range(len(dataset)):
        classes = tuple(c for c in dataset.classes_present(index) if c in wanted)
        if not classes:
            continue
        samples.extend([(index, classes)] if classes_per_sample == "all" else [(index, (c,)) for c in classes])
    if not samples:
        raise UserError(f"{dataset.root}: no image shows any seen class of this fold")
    return samples


def _class_text(config: TrainConfig, encoders, names: list[str]) -> np.ndarray:
    """Class-name embeddings from the run's text store when it exists, else from the backbone's text tower."""
    store = config.data.text_store
    if store and Path(store).exists():
        return class_embeddings(text_store=store, names=names)
    if encoders.text is None:
        raise UserError(f"online: '{config.data.online.backbone}' has no text tower; give a text store "
                        f"with `data.text_cache`")
    return encoders.text.encode_names([prompt_name(n) for n in names]).float().cpu().numpy()


class OnlineBatches(BatchSource):
    """Fresh augmentations decoded by the DataLoader's workers, encoded by the frozen tower at every step."""

    mode = "online"

    def __init__(self, *, loader: DataLoader, order: EpochOrder, vision, text: np.ndarray, width: int,
                 novel: tuple[int, ...], novel_pixels: str):
        self.loader, self.order, self.vision, self.text = loader, order, vision, text
        self.width, self.novel, self.novel_pixels = width, novel, novel_pixels

    def batches(self, *, epoch: int, skip: int = 0):
        self.order.epoch, self.order.skip = epoch, skip
        for images, masks, classes, index in self.loader:
            features = self.vision.encode(images).to(torch.float16).cpu()  # the precision of cached tokens
            targets, valid = binary_targets(masks=masks, classes=classes, width=self.width, novel=self.novel,
                                            novel_pixels=self.novel_pixels)
            txt = np.zeros((len(classes), self.width, self.text.shape[1]), np.float32)
            for b, cls in enumerate(classes):
                txt[b, :len(cls)] = self.text[np.asarray(cls) - 1]
            yield Batch(features=features, text=torch.from_numpy(txt), text_mask=torch.from_numpy(valid),
                        targets=torch.from_numpy(targets), views=index)


def prepare_online(config: TrainConfig) -> TrainingData:
    """The online data path: dataset, samples, text, the frozen encoder and a worker DataLoader."""
    online, data = config.data.online, config.data
    if not online.backbone or not online.data_root:
        raise UserError(f"online training needs a backbone and a data root "
                        f"({setting('data.online.backbone')}, {setting('data.online.data_root')})")
    if online.workers < 0:
        raise UserError("data.online.workers must be 0 or more")
    if online.augment.backend != "cpu":
        raise UserError(f"online training augments in its DataLoader workers on the CPU: leave "
                        f"{setting('data.online.augment.backend')} at cpu (the gpu backend is for `fusioner extract`)")
    dataset = create_dataset(online.dataset, root=online.data_root, split=online.split)
    fold = resolve_fold(protocol=data.protocol, fold=data.fold, novel=data.novel,
                        class_names=list(dataset.class_names))
    text_needed = not (data.text_store and Path(data.text_store).exists())
    encoders = create_encoder(online.backbone, vision=True, text=text_needed, weights=online.weights,
                              random_init=online.random_init, input_size=online.input_size,
                              device=resolve_device(config.device))
    if encoders.vision is None:
        raise UserError(f"online: encoder '{online.backbone}' has no vision tower")
    vision = encoders.vision
    text = _class_text(config, encoders, list(dataset.class_names))
    samples = _online_samples(dataset, fold.seen, data.classes_per_sample)
    augment = resolve_augment(online.augment, class_names=dataset.class_names)
    views = FreshViews(dataset=dataset, samples=samples, augment=augment, size=vision.input_size, seed=config.seed)
    order = EpochOrder(count=len(samples), batch_size=config.optim.batch_size, seed=config.seed)
    # Spawned, not forked: a forked worker inherits zarr's event-loop thread and torch's thread pools
    # half-held and can deadlock (it hung a full test run that had opened stores before this).
    loader = DataLoader(views, batch_sampler=order, num_workers=online.workers, collate_fn=collate,
                        persistent_workers=online.workers > 0, worker_init_fn=_quiet_worker,
                        multiprocessing_context="spawn" if online.workers > 0 else None)
    described = OnlineSource(encoder=online.backbone, path=str(online.data_root),
                             grid=tuple(vision.grid), input_size=vision.input_size,
                             pretrained=bool(encoders.weights.pretrained), class_names=list(dataset.class_names))
    source = OnlineBatches(loader=loader, order=order, vision=vision, text=text,
                           width=max(len(c) for _, c in samples), novel=tuple(fold.novel),
                           novel_pixels=data.novel_pixels)
    return TrainingData(source=source, split=described, samples=samples, text=text, fold=fold,
                        vision_dim=int(vision.dim))
