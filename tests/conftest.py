"""Shared fixtures: the real data beside the checkout, skipped cleanly when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSIONER_SHARED", ROOT.parent / "shared"))

# Keep tests offline and single-threaded enough for a 2-core machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (real photos, split lists); tests using it skip when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


def _shared_path(shared_dir: Path, *parts: str) -> Path:
    path = shared_dir.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"../shared/{'/'.join(parts)} is not present")
    return path


@pytest.fixture(scope="session")
def coco128(shared_dir: Path) -> Path:
    return _shared_path(shared_dir, "data", "coco128")


@pytest.fixture(scope="session")
def voc_sample(shared_dir: Path) -> Path:
    return _shared_path(shared_dir, "data", "voc-sample")


@pytest.fixture(scope="session")
def splits_dir(shared_dir: Path) -> Path:
    return _shared_path(shared_dir, "splits")
