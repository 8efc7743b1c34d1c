"""The demo caches every sweep test trains on, extracted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench.sweep import build_demo_caches


@pytest.fixture(scope="session")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """(vision store, text store) of a small generated dataset: the tiny test-vit tower, packaged MiniLM text."""
    return build_demo_caches(tmp_path_factory.mktemp("sweep-caches"), backbone="test-vit")
