"""Progress bars: rate and ETA on a terminal, sparse plain lines in logs, nothing under --quiet."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import sys

import torch
from tqdm.auto import tqdm

from pipeline.errors import UserError


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is no terminal, yet a live bar is what one wants)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress(*, total: int | None, desc: str, quiet: bool = False, unit: str = "it", initial: int = 0):
    """A tqdm bar (a widget in a notebook, where ipywidgets is installed); when stderr is neither a
    terminal nor a notebook's (CI logs) it prints a plain line every 30 s."""
    interactive = sys.stderr.isatty() or in_notebook()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=quiet,
        dynamic_ncols=interactive,
        ascii=not interactive,
        mininterval=0.2 if interactive else 30.0,
        leave=True,
    )


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("fusioner", "torch", "open_clip_torch", "timm", "transformers", "zarr", "numpy"):
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device '{name}'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return device


def machine() -> str:
    device = "no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def load_average() -> str:
    """Other processes' load: wall-clock figures from a busy machine are upper bounds."""
    return "n/a" if not hasattr(os, "getloadavg") else f"{os.getloadavg()[0]:.2f}"


def load_torch_file(path, *, map_location="cpu", what: str = "file"):
    """``torch.load`` of a user's file with ``weights_only=True``: tensors and plain values, never code.

    A pickle that needs more (any class or function beyond torch's allow-list) is refused
    rather than run, and an empty or truncated file is reported, each in one line naming it.
    """
    import pickle
    import re

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        needs = f" (it names {named.group(1)})" if named else ""
        raise UserError(f"{path}: refusing to load this {what}: it holds more than tensors and plain values{needs}; "
                        f"save only its state_dict (weights_only=True loading)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{path}: cannot read this {what} (empty or truncated?): {first}") from None


def default_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode an ordinary new file gets (0644 under the usual umask).

    safetensors writes its files 0600, so a checkpoint was the one file of a run its group
    could not read.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
