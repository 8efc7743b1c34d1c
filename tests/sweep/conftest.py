"""The demo caches every sweep test trains on, extracted once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from session_builds import one_builder, session_root

from pipeline.bench.sweep import build_demo_caches


@pytest.fixture(scope="session")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """(vision store, text store) of a small generated dataset: the tiny test-only towers test-vit and test-text.

    No sweep test checks an encoder: the tiny text tower spares the extraction MiniLM's CPU-seconds. One
    process of the session builds them (about 15 CPU-seconds), the others read them; nothing writes to them.
    """
    root = session_root(tmp_path_factory) / "sweep-caches"
    with one_builder(root.with_suffix(".lock")):
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build interrupted part-way
            build_demo_caches(root, backbone="test-vit", text="test-text")
            (root / "done").write_text("ok\n")
    return root / "test-vit", root / "test-text"
