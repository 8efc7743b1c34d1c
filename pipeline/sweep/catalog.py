"""The studies shipped inside the package (``pipeline/studies/*.yaml``), found by name.

``fusioner sweep table2`` runs the shipped ``table2.yaml`` from any folder, without a
checkout; ``fusioner sweep --list`` shows what is shipped. A path to a file of your own
always wins over a shipped name.
"""

from __future__ import annotations

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


def describe_studies() -> str:
    """One line per shipped study: its name and the first line of its header comment."""
    rows = []
    for name, path in shipped_studies().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        rows.append(f"{name:8s}  {first}")
    return "\n".join(rows + ["", f"(files in {studies_dir()}; run one with `fusioner sweep NAME`, "
                                 "copy one to change it)"])
