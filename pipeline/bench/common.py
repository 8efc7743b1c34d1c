"""What every benchmark main shares: its work folder."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def work_folder(given: Path | None, *, prefix: str) -> Iterator[Path]:
    """``given`` (created if needed, kept afterwards), or a temporary folder removed at the end."""
    work = Path(given) if given is not None else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if given is None:
            shutil.rmtree(work, ignore_errors=True)
