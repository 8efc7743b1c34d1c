"""The studies shipped inside the package (``pipeline/studies/*.yaml``), found by name.

``fusioner sweep table2`` runs the shipped ``table2.yaml`` from any folder, without a
checkout; ``fusioner sweep --list`` shows what is shipped. A path to a file of your own
always wins over a shipped name.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from pipeline.errors import UserError


def studies_dir() -> Path:
    """The folder of shipped study files (package data)."""
    return Path(str(resources.files("pipeline") / "studies"))


def shipped_studies() -> dict[str, Path]:
    """Shipped study name -> file, sorted by name."""
    return {p.stem: p for p in sorted(studies_dir().glob("*.yaml"))}


def find_study(study: str | Path) -> Path:
    """A study file: ``study`` itself when it is a file, else the shipped study of that name."""
    path = Path(study)
    if path.is_file():
        return path
    shipped = shipped_studies()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if name in shipped and (len(path.parts) == 1 or path.parent.as_posix().endswith("pipeline/studies")):
        return shipped[name]
    raise UserError(f"study file not found: {study} (shipped studies: {', '.join(shipped) or 'none'}; "
                    f"`fusioner sweep --list` describes them)")


def _first_sentence(text: str) -> str:
    """The first sentence of a study file's header comment (its first paragraph, lines joined)."""
    paragraph = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words = line.lstrip("#").strip()
        if not words and paragraph:
            break
        paragraph += [words] if words else []
    joined = " ".join(paragraph)
    match = re.search(r"[.?!](?=\s|$)", joined)
    return joined[:match.end()] if match else joined


def describe_studies() -> str:
    """One line per shipped study: its name, aligned, and the first sentence of its header comment."""
    studies = shipped_studies()
    width = max((len(name) for name in studies), default=0)
    rows = [f"{name:{width}s}  {_first_sentence(path.read_text())}" for name, path in studies.items()]
    return "\n".join(rows + ["", f"(files in {studies_dir()}; run one with `fusioner sweep NAME`, "
                                 "copy one to change it)"])
