"""Shared fixtures: the real data beside the checkout, skipped cleanly when absent."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from memory import release_memory
from session_builds import one_builder, session_root
from synthetic_data import Generated, generated_cache, trained_run

import pipeline.encode.extract
from pipeline.encode.families import create_encoder
from pipeline.host import keep_freed_memory, threads_each

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSIONER_SHARED", ROOT.parent / "shared"))

# Keep tests offline and single-threaded enough for a 2-core machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config) -> None:
    """Under pytest-xdist each test process gets its share of the cores, and so do its children.

    ``make test`` runs one process per core; each torch would otherwise take every core, and the
    subprocesses (sweep runs, extraction workers, the demo) too. Oversubscribed, small torch
    operations wait for each other's time slices: a tiny-preset sweep run took 2.3 CPU-seconds at one
    thread and 6-8 at two beside the other test process. OMP_NUM_THREADS carries the share to the
    children (a sweep reads it through ``pipeline.host.threads_each``); a value already set wins.
    """
    keep_freed_memory()  # as every fusioner process does: in-process training reuses what a step freed
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_each(workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


# --------------------------------------------------------------------------- #
# Generated data and shared state, for the modules that ask for them
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, OpenMP spinning crawls on a busy 2-core box, and one thread
    keeps sums in one order across processes. Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; module scope puts it in force before the
    module-scoped fixtures that train or extract.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reuse_encoders():
    """Build each encoder once per module for in-process extractions, and let it go after the module.

    A frozen encoder whose weights are seeded by its name is exactly what every rebuild would
    return, so a module's extractions share one. The cache dies with the module: a full-size
    tower held for the whole session is what once took the suite past 11 GB. Subprocesses
    and dask workers still build their own.
    """
    reused = functools.lru_cache(maxsize=None)(create_encoder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.encode.extract, "create_encoder", reused)
        yield reused
    reused.cache_clear()
    release_memory()


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Generated:
    """The shared generated cache (rectangles, test-vit random-init, MiniLM text), built once per session
    (one xdist process builds it, the other reads it: each build costs about 13 CPU-seconds)."""
    root = session_root(tmp_path_factory)
    with one_builder(root / "generated.lock"):
        return generated_cache(root / "generated")


@pytest.fixture(scope="module")
def learned(gen, tmp_path_factory) -> Path:
    """A run of the tiny preset trained on ``gen``, once per session (shared by the xdist processes)."""
    root = session_root(tmp_path_factory)
    with one_builder(root / "learned.lock"):
        return trained_run(gen, root)
