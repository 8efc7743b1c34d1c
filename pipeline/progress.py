"""Progress bars: rate and ETA on a terminal, sparse plain lines in logs, nothing under --quiet."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(*, total: int | None, desc: str, quiet: bool = False, unit: str = "it", initial: int = 0):
    """A tqdm bar; when stderr is not a terminal (CI logs) it prints a plain line every 30 s."""
    interactive = sys.stderr.isatty()
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
