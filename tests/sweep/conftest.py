"""The demo caches every sweep test trains on, extracted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench.sweep import build_demo_caches


@pytest.fixture(scope="session")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """(vision store, text store) of a small generated dataset: the tiny test-only towers test-vit and test-text.

    No sweep test checks an encoder: the tiny text tower spares the extraction MiniLM's CPU-seconds.
    """
    return build_demo_caches(tmp_path_factory.mktemp("sweep-caches"), backbone="test-vit", text="test-text")
