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
        raise UserError("`device` cuda asked for, but no CUDA device is available")
    return device


def machine() -> str:
    device = "no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def load_average() -> str:
    """Other processes' load: wall-clock figures from a busy machine are upper bounds."""
    return "n/a" if not hasattr(os, "getloadavg") else f"{os.getloadavg()[0]:.2f}"


def _refusal(path, what: str, named: str | None) -> UserError:
    """The one line for a file that holds more than weights; it never suggests loading it anyway."""
    needs = f" (it names {named})" if named else ""
    return UserError(f"{path}: refusing to load this {what}: it holds more than weights{needs}, and loading it "
                     f"could run code; use a file that holds only the tensors (a state_dict or .safetensors)")


def plain_classes() -> tuple[type, ...]:
    """Plain classes that released checkpoints carry besides tensors (DINO's full checkpoint keeps its
    ``argparse.Namespace`` of options, which holds paths), allowed into a weights-only load: building
    them runs no code of the file's choosing."""
    import argparse
    import pathlib

    return (argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath)


def load_torch_file(path, *, map_location="cpu", what: str = "file"):
    """``torch.load`` of a user's file with ``weights_only=True``: tensors and plain values, never code.

    A pickle that needs more (any class or function beyond torch's allow-list and
    :func:`plain_classes`) is refused rather than run, and an empty or truncated file is
    reported, each in one line naming it.
    """
    import pickle
    import re

    try:
        with torch.serialization.safe_globals(list(plain_classes())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise _refusal(path, what, named.group(1) if named else None) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{path}: cannot read this {what} (empty or truncated?): {first}") from None


_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".tar")


def refuse_code_in_weights(path, *, what: str = "weights file") -> None:
    """Refuse, in one line, a weights file (or a folder's pickled weight files) that names anything
    beyond torch's tensor allow-list, before a library is handed it.

    Libraries load weights-only too, but their refusal is a long traceback whose last line
    advises turning that protection off, which would run the code. Zip checkpoints are read
    statically (the pickle's globals, no tensor loaded); TorchScript archives (OpenAI's CLIP
    files) hold compiled TorchScript and are left to ``torch.jit.load``; other pickles get a
    weights-only load. ``.safetensors`` files hold no code.
    """
    import zipfile
    from pathlib import Path

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _PICKLED) \
        if path.is_dir() else []
    for file in files:
        if file.suffix == ".safetensors":
            continue
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                if any("/code/" in name for name in archive.namelist()):  # TorchScript
                    continue
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
            except Exception:  # noqa: BLE001 - not a torch zip: the weights-only load below says what it is
                unsafe = None
            allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in plain_classes()}
            unsafe = [name for name in unsafe or [] if name not in allowed] if unsafe is not None else None
            if unsafe:
                raise _refusal(file, what, unsafe[0])
            if unsafe is not None:
                continue
        load_torch_file(file, what=what)


def default_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode an ordinary new file gets (0644 under the usual umask).

    safetensors writes its files 0600, so a checkpoint was the one file of a run its group
    could not read.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
