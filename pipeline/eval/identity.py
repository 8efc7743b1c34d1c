"""Stores that must not be mixed: a run's recorded identity against the stores it is scored or used with.

A model trained on one encoder's features means nothing on another's, even at the same
width; nor on features of another input size, images normalised with other statistics, or
class embeddings made from other words. Training records what it read (``inputs.json``:
the encoders' identities, the training split's normalisation, the text store's class
words); evaluation and prediction compare that with the stores they are handed, and a
difference is a one-line error unless the user names it in ``allow`` (``--allow-mismatch``),
in which case it is returned so that the result can say it was scored anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import UserError
from pipeline.store.layout import open_store, store_attrs, text_class_words
from pipeline.training.inputs import read_run_inputs, split_normalization

# What may differ between a run and a store, each a name for --allow-mismatch.
ASPECTS = ("encoder", "weights", "input_size", "normalize", "class_words")


def _is_store(path) -> bool:
    return path is not None and (Path(path) / "zarr.json").is_file()


def recorded_identity(*, run: str | Path, config) -> dict:
    """What the run was trained on: vision and text identities, normalisation, class words (None: unknown).

    Runs trained before ``inputs.json`` recorded an entry fall back to the stores the config names,
    when they are reachable.
    """
    kept = read_run_inputs(run) or {}
    data = config.data
    vision_store = data.cache if _is_store(data.cache) else None
    text_store = data.text_store if _is_store(data.text_store) else None
    vision = kept.get("vision") or (store_attrs(open_store(vision_store)) if vision_store else None)
    text = kept.get("text") or (store_attrs(open_store(text_store)) if text_store else None)
    if "normalize" in kept:
        normalize = kept["normalize"]
    else:
        normalize = split_normalization(vision_store, data.split) if vision_store and not data.online.enabled else None
    if "class_words" in kept:
        words = kept["class_words"]
    else:
        words = text_class_words(open_store(text_store)) or None if text_store else None
    return {"vision": vision, "text": text, "normalize": normalize, "class_words": words}


def _weights(identity: dict) -> str:
    weights = identity.get("weights") or {}
    return str(weights.get("sha256") or weights.get("source"))


def _stats(normalize: dict) -> str:
    name = normalize.get("name")
    return f"{name} statistics" if name else f"mean {normalize.get('mean')} / std {normalize.get('std')}"


def _same_stats(a: dict, b: dict) -> bool:
    return all(abs(float(x) - float(y)) < 1e-6 for key in ("mean", "std") for x, y in zip(a[key], b[key]))


def _tower_mismatches(*, tower: str, recorded: dict | None, store: str | Path | None, sizes: bool) -> list:
    if recorded is None or not _is_store(store):
        return []
    found = store_attrs(open_store(store))
    found_list = []
    if found.get("encoder") != recorded.get("encoder"):
        found_list.append(("encoder", f"{tower} encoder: trained on {recorded.get('encoder')} features, {store} holds "
                                      f"{found.get('encoder')}"))
    elif _weights(found) != _weights(recorded):
        found_list.append(("weights", f"{tower} weights: trained with {_weights(recorded)}, {store} was made with "
                                      f"{_weights(found)}"))
    if sizes and (found.get("input_size") != recorded.get("input_size")
                  or list(found.get("grid") or []) != list(recorded.get("grid") or [])):
        found_list.append(("input_size", f"input size: trained at {recorded.get('input_size')} px (grid "
                                         f"{recorded.get('grid')}), {store} holds {found.get('input_size')} px "
                                         f"(grid {found.get('grid')})"))
    return found_list


def store_mismatches(*, recorded: dict, vision_store: str | Path | None, text_store: str | Path | None,
                     split: str | None) -> list[tuple[str, str]]:
    """(aspect, one-line description) for every way the stores differ from what the run recorded."""
    found = _tower_mismatches(tower="vision", recorded=recorded["vision"], store=vision_store, sizes=True)
    found += _tower_mismatches(tower="text", recorded=recorded["text"], store=text_store, sizes=False)
    if recorded["normalize"] and split and _is_store(vision_store):
        normalize = split_normalization(vision_store, split)
        if normalize and not _same_stats(normalize, recorded["normalize"]):
            found.append(("normalize", f"normalisation: trained on images normalised with "
                                       f"{_stats(recorded['normalize'])}, {vision_store} {split} with "
                                       f"{_stats(normalize)}"))
    if recorded["class_words"] and _is_store(text_store):
        words = text_class_words(open_store(text_store))
        if words and words != recorded["class_words"]:
            found.append(("class_words", f"class words: trained with {recorded['class_words']} class names, "
                                         f"{text_store} holds {words} names"))
    return found


def check_allow(allow: Iterable[str]) -> tuple[str, ...]:
    """The aspect names of ``--allow-mismatch`` (comma lists accepted), checked."""
    names = tuple(dict.fromkeys(part.strip() for item in allow for part in str(item).split(",") if part.strip()))
    unknown = [n for n in names if n not in ASPECTS]
    if unknown:
        raise UserError(f"`allow_mismatch`: unknown aspect {unknown[0]!r} (known: {', '.join(ASPECTS)})")
    return names


def check_stores(*, run: str | Path, config, vision_store: str | Path | None, text_store: str | Path | None,
                 split: str | None, allow: Iterable[str] = ()) -> list[str]:
    """Refuse stores that differ from the run's record, except in the ``allow``ed aspects.

    Returns the descriptions of the allowed differences (to be recorded beside the scores).
    """
    allowed = check_allow(allow)
    found = store_mismatches(recorded=recorded_identity(run=run, config=config), vision_store=vision_store,
                             text_store=text_store, split=split)
    refused = [(aspect, text) for aspect, text in found if aspect not in allowed]
    if refused:
        aspects = ",".join(dict.fromkeys(aspect for aspect, _ in refused))
        raise UserError(f"{run}: these stores do not match the run: {'; '.join(t for _, t in refused)} "
                        f"(pass `allow_mismatch` {aspects} to use them anyway)")
    return [text for _, text in found]
