"""Fixtures of the page's tests: the shared test run, loaded once, served on a free loopback port."""

from __future__ import annotations

import pytest
from serving import running

from pipeline.eval.predict import Predictor


@pytest.fixture(scope="module")
def predictor(learned):
    return Predictor(checkpoint=learned, device="cpu")


@pytest.fixture(scope="module")
def served(predictor):
    """The page over the shared test run, default limits (skipped without the serve extra)."""
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    from pipeline.serve.app import ServeLimits, build_app

    with running(build_app(predictor=predictor, limits=ServeLimits())) as url:
        yield url
