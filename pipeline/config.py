"""Config dataclasses: loading from YAML/JSON, strict dotted overrides, saving.

Every artefact (store, checkpoint, run directory) carries the config that made
it. Overrides such as ``--set fusion.layers=6`` are checked strictly: an unknown
key or a value of the wrong type is a one-line :class:`UserError`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

from pipeline.errors import UserError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; configs mean a number.

    Aliases (``*name``) are refused: nested ones expand exponentially (a few lines can name a
    billion values and hang the reader), and no config needs them.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not accepted in configs; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def to_dict(obj: Any) -> Any:
    """A JSON-ready copy of a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any, *, length: int = 12) -> str:
    """A short stable hash of a config (its canonical JSON)."""
    text = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting where lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(f"config key '{key}': {value!r} does not fit {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config key '{key}': expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{key}': expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, *, prefix: str = "") -> T:
    """Build config dataclass ``cls`` from a mapping; unknown keys are errors."""
    if not isinstance(data, dict):
        raise UserError(f"config '{prefix.rstrip('.') or cls.__name__}': expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value``; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}' has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def flatten_keys(data: dict, prefix: str = "") -> dict:
    """Nested mappings -> dotted keys (``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_key(data: dict, key: str, value: Any, *, where: str = "") -> None:
    """Set dotted ``key`` in nested ``data``; a key the mapping does not already have is a UserError."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            break
    if not isinstance(node, dict) or parts[-1] not in node:
        raise UserError(f"{where + ': ' if where else ''}unknown config key '{key}'")
    node[parts[-1]] = copy.deepcopy(value)


def get_key(data: dict, key: str) -> Any:
    """The value at dotted ``key`` of nested ``data``."""
    for part in key.split("."):
        data = data[part]
    return data


def as_settings(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Dotted-key settings as a mapping: a mapping is taken as it is (values already typed),
    ``key=value`` strings (a study file's or a script's) are parsed with :func:`parse_override`."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides)


def apply_overrides(cls: type[T], base: dict, overrides: Mapping[str, Any] | Iterable[str]) -> T:
    """Set dotted keys of ``base`` (``{"optim.epochs": 5}``) and build ``cls`` strictly."""
    data = json.loads(json.dumps(base))
    for key, value in as_settings(overrides).items():
        set_key(data, key, value)
    return from_dict(cls, data)


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON mapping, with a one-line error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml_load(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_dict(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
