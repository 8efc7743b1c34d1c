"""Stage one: run the frozen encoders once and write their features into a store.

The work is planned before any pixel is decoded (image sizes from headers,
every view's box, flip and jitter from a seeded generator), written into the
store, and then done shard by shard. A shard is the unit of work, of writing
and of resuming: it is rendered, encoded in fixed batches and written whole,
then marked done. Re-running the same command skips finished shards, so a
killed run resumes and ends with the same bytes as an uninterrupted one.
Several workers (processes on one machine or on a dask cluster) each take
whole shards.

While the encoder runs on shard ``i``, a thread renders shard ``i + 1`` and
another writes shard ``i - 1``: decoding and writing overlap the forward pass.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from pipeline.encode.families import create_encoder
from pipeline.encode.config import ExtractConfig
from pipeline.encode.plan import open_extraction_dataset, plan_split
from pipeline.encode.prompts import TEMPLATES
from pipeline.encode.registry import activation, get_spec, spec_record
from pipeline.encode.shards import StageTimes, run_shards
from pipeline.encode.towers import Encoders
from pipeline.errors import UserError
from pipeline.runtime import resolve_device
from pipeline.store.layout import (
    TextTableDamaged,
    check_text_words,
    consolidate,
    has_text,
    open_or_create_store,
    read_text,
    store_identity,
    write_text,
    writer_lock,
)
from pipeline.store.splits import create_split, done_shards, repair_lost_shards

# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


@dataclass
class ExtractReport:
    out: str
    split: str | None
    views: int
    shards_run: int
    shards_skipped: int
    text_classes: int
    bad: list[tuple[str, str]]
    pretrained: bool
    shard_seconds: float = 0.0  # render + encode + write of the shards run (encoder build and text excluded)
    stages: dict | None = None  # where shard_seconds went (StageTimes), when the shards ran in this process

    def describe(self) -> str:
        """What was written, for the command line."""
        lines = []
        if self.split:
            lines.append(f"{self.out} {self.split}: {self.views} views, {self.shards_run} shards written, "
                         f"{self.shards_skipped} already done")
        if self.text_classes:
            lines.append(f"{self.out} text: {self.text_classes} class names embedded")
        return "\n".join(lines)

    @property
    def notes(self) -> list[str]:
        """Warnings for stderr: skipped images, random-init weights."""
        lines = []
        if self.bad:
            lines.append(f"skipped {len(self.bad)} bad image(s):")
            lines += [f"  {image_id}: {reason}" for image_id, reason in self.bad]
        if not self.pretrained:
            lines.append("note: random-init weights; features are for pipeline checks, not results")
        return lines


def _text_names(dataset, config: ExtractConfig) -> list[str]:
    names = list(dataset.class_names)
    return names + [n for n in config.extra_names if n not in names]


# Class lists that need no data on disk (text-only stores): dataset name -> protocol.
_BUILTIN_VOCABULARIES = {"voc": "pascal5i", "pascal": "pascal5i", "coco": "coco20i", "coco2014": "coco20i"}


def builtin_names(config: ExtractConfig) -> list[str]:
    """Class names for a text-only extraction without a data root."""
    from pipeline.data.protocols import create_protocol

    names: list[str] = []
    if config.dataset:
        if config.dataset not in _BUILTIN_VOCABULARIES:
            raise UserError(f"`text_only` without `data_root` knows the class names of "
                            f"{', '.join(sorted(_BUILTIN_VOCABULARIES))}; give `data_root` for '{config.dataset}'")
        names = list(create_protocol(_BUILTIN_VOCABULARIES[config.dataset]).class_names)
    return names + [n for n in config.extra_names if n not in names]


def extract(*, config: ExtractConfig, quiet: bool = False, client=None) -> ExtractReport:
    """Plan, then extract the missing shards of one dataset split (and its text).

    The store's writer lock is held throughout: a second extraction into the same ``--out``
    is refused in one line naming the holder (this one's own workers write disjoint shards).
    """
    with writer_lock(config.out):
        return _extract(config=config, quiet=quiet, client=client)


def _check_counts(config: ExtractConfig) -> None:
    """Counts below 1 would write zeros, one window per image or nothing at all: refused."""
    for flag, value in (("`views`", config.views), ("`workers`", config.workers),
                        ("`batch_size`", config.batch_size), ("`shard_size`", config.shard_size),
                        ("`stride`", config.stride), ("`writers`", config.writers),
                        ("`input_size`", config.input_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if config.render_workers < 0:
        raise UserError(f"`render_workers` must be at least 0, got {config.render_workers}")
    if config.layout not in ("image", "shuffled"):
        raise UserError(f"`layout` must be image or shuffled, not '{config.layout}'")
    if config.layout == "shuffled" and config.kind != "views":
        raise UserError(f"`layout` shuffled orders training views; split '{config.split}' is stored as evaluation "
                        f"{config.kind}, image by image: leave `layout` out")
    if config.episode_folds and not config.episodes:
        raise UserError("`episode_folds` picks the folds of `episodes`; pass `episodes` SPLITS too, or leave `episode_folds` out")


def _extract(*, config: ExtractConfig, quiet: bool, client) -> ExtractReport:
    from pipeline.data.registry import create_dataset

    spec = get_spec(config.backbone)
    if config.text_only and "text" not in spec.towers:
        raise UserError(f"`text_only`: encoder '{spec.name}' has no text tower")
    want_vision = not config.text_only and "vision" in spec.towers
    _check_counts(config)
    if want_vision and config.kind == "views" and config.augment.backend == "gpu":
        from pipeline.data.augment_gpu import require_kornia

        require_kornia()  # the switch without its extra: one line, before the store is touched
    dataset = None
    if want_vision:
        if not config.dataset or not config.data_root:
            raise UserError("extracting image features needs `dataset` and `data_root`")
        dataset = open_extraction_dataset(config)
    elif config.dataset and config.data_root:
        dataset = create_dataset(config.dataset, root=config.data_root, split=config.split,
                                 skip_bad=config.skip_bad, **config.dataset_options)
    names = _text_names(dataset, config) if dataset is not None else builtin_names(config)
    if not want_vision and not names:
        raise UserError("`text_only` needs `dataset` (for its class names) or `extra_names`")
    device = resolve_device(config.device)
    input_size = config.input_size or spec.input_size
    if config.text_only and config.vision_only:
        raise UserError("`text_only` and `vision_only` exclude each other")
    want_text = "text" in spec.towers and not config.vision_only
    encoders = create_encoder(spec.name, vision=want_vision, text=want_text,
                              weights=config.weights, random_init=config.random_init,
                              input_size=input_size, device=device)
    grid = encoders.vision.grid if encoders.vision else None
    identity = store_identity(
        encoder=spec.name, weights=encoders.weights.to_dict(), input_size=input_size, grid=grid,
        vision_dim=spec.vision_dim or None, text_dim=spec.text_dim or None, mean=spec.mean, std=spec.std,
        activation=activation(spec))
    identity["spec"] = spec_record(spec)  # what the encoder is, as data: library names resolve to one too
    root = open_or_create_store(config.out, identity=identity, overwrite=config.overwrite, vision=want_vision)
    text_count = _extract_text(root, encoders=encoders, names=names, config=config, quiet=quiet)
    if not want_vision:
        return ExtractReport(out=config.out, split=None, views=0, shards_run=0, shards_skipped=0,
                             text_classes=text_count, bad=[], pretrained=encoders.weights.pretrained)
    return _extract_vision(root, encoders=encoders, dataset=dataset, config=config, identity=identity,
                           text_count=text_count, quiet=quiet, client=client)


def _extract_text(root, *, encoders: Encoders, names: list[str], config: ExtractConfig, quiet: bool) -> int:
    """Embed the class names the store lacks; returns how many names the store now serves."""
    from pipeline.data.labels import resolve_class_words, text_words

    if encoders.text is None or not names:
        return 0
    words = resolve_class_words(config.class_words, dataset=config.dataset)
    check_text_words(root, class_words=words)
    fresh = False
    if config.verify and has_text(root):
        try:
            read_text(root)
        except TextTableDamaged:  # every name it held is encoded again, with this run's
            names, fresh = list(dict.fromkeys([*root["text"].attrs["names"], *names])), True
            if not quiet:
                print(f"note: {config.out}: the class-name embeddings were damaged; writing them again",
                      file=sys.stderr)
    known = set(read_text(root)[0]) if has_text(root) and not fresh else set()
    todo = [n for n in names if n not in known]
    if todo:
        emb = encoders.text.encode_names([text_words(n, words) for n in todo], quiet=quiet).cpu().numpy()
        write_text(root, names=todo, embeddings=emb, fresh=fresh,
                   meta={"encoder": encoders.spec.name, "templates": list(TEMPLATES), "class_words": words,
                         "prompt_names": {n: text_words(n, words) for n in names}})
    return len(names)


def _extract_vision(root, *, encoders: Encoders, dataset, config: ExtractConfig, identity: dict, text_count: int,
                    quiet: bool, client) -> ExtractReport:
    """Plan the split, then run its shards that are not done yet (here, or on ``config.workers`` workers)."""
    spec, grid, input_size = encoders.spec, encoders.vision.grid, encoders.vision.input_size
    tokens = grid[0] * grid[1]
    plan = plan_split(dataset=dataset, config=config, input_size=input_size, tokens=tokens, dim=spec.vision_dim)
    if not quiet:  # what is about to be written, before the first pixel is decoded
        size = plan.num_views * tokens * spec.vision_dim * 2
        print(f"{plan.group_path}: {len(plan.image_ids)} images, {plan.num_views} views, about "
              f"{size / 2**30:.2f} GiB of fp16 features", file=sys.stderr)
    group = create_split(root, plan=plan, tokens=tokens, dim=spec.vision_dim, input_size=input_size)
    repair_lost_shards(group, quiet=quiet, verify=config.verify)
    done = done_shards(group)
    todo = [int(s) for s in np.flatnonzero(~done)]
    started, times = time.perf_counter(), None
    if config.workers > 1 and len(todo) > 1:
        from pipeline.encode.parallel import run_parallel

        del encoders
        bad = run_parallel(config=config, shards=todo, group_path=plan.group_path, client=client, quiet=quiet)
    else:
        times = StageTimes()
        bad = run_shards(config=config, shards=todo, encoders=encoders, dataset=dataset, quiet=quiet,
                         times=times) if todo else []
    shard_seconds = time.perf_counter() - started
    skipped = plan.meta["plan_skipped"] + [list(b) for b in bad]
    if skipped:
        group.attrs["skipped"] = sorted({tuple(s) for s in skipped} | {tuple(s) for s in group.attrs.get("skipped", [])})
        consolidate(root, splits=[plan.group_path])  # the rewrite of the group's attributes dropped its copy
    return ExtractReport(out=config.out, split=plan.group_path, views=plan.num_views, shards_run=len(todo),
                         shards_skipped=int(done.sum()), text_classes=text_count, bad=[tuple(s) for s in skipped],
                         pretrained=bool(identity["pretrained"]), shard_seconds=shard_seconds,
                         stages=times.as_dict() if times else None)
