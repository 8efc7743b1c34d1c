"""The docs cannot drift: every command and Python snippet of README.md and docs/*.md is checked.

- every ``fusioner ...`` line of a shell block is parsed by the real command line (options,
  arguments, types, required values) without running it: most name datasets, weights or a GPU
  this machine lacks, so this is a ``--help``-level check, said plainly;
- the commands that need no data (``encoders``, ``datasets``, ``sweep --list``, ``--version``) run;
- every Python block compiles, and the one of docs/api.md, written for the shared sample data,
  runs (slow);
- every dotted ``pipeline.`` name in backticks is importable.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from cli import app, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(kind: set[str]):
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            if match.group(1) in kind:
                yield page, match.group(2)


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for page, block in _blocks({"", "bash", "sh", "shell", "console"}):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for prefix in (".venv/bin/fusioner ", "fusioner "):
                if line.startswith(prefix):
                    words = shlex.split(line[len(prefix):], comments=True)
                    found.append((f"{page.name}: fusioner {' '.join(words)}", words))
    return found


COMMANDS = _commands()


def _parse_only(words: list[str]) -> None:
    """Parse a command line as `fusioner` would, down to the subcommand, without invoking it."""
    group = typer.main.get_command(app)
    words = [w for w in words if w not in ("-v", "--verbose", "-q", "--quiet")] + \
        [w for w in words if w in ("-v", "--verbose", "-q", "--quiet")]  # accepted on both sides
    name, rest = words[0], words[1:]
    command = group.commands.get(name)
    assert command is not None, f"no command {name!r}"
    with command.make_context(f"fusioner {name}", rest):
        pass


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 25
    names = {words[0] for _, words in COMMANDS if words}
    assert {"extract", "train", "eval", "predict", "sweep", "demo", "info"} <= names


def test_documented_training_caches_of_the_paper_datasets_build_the_recipes_views():
    """A voc/coco training cache in the docs is extracted with the paper studies' K, never the default 1."""
    from pipeline.encode.config import RECIPE_VIEWS

    training = [(where, words) for where, words in COMMANDS if words[:1] == ["extract"] and "--split" in words
                and words[words.index("--split") + 1] == "train" and "--dataset" in words
                and words[words.index("--dataset") + 1] in ("voc", "coco")]
    assert training
    for where, words in training:
        assert "--views" in words and int(words[words.index("--views") + 1]) == RECIPE_VIEWS, where


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses(where, words, capsys):
    if words in (["--version"], ["--help"]) or "--help" in words or "-h" in words:
        assert main(words) == 0
        return
    try:
        _parse_only(words)
    except Exception as err:  # noqa: BLE001 - shown with the page and line it came from
        pytest.fail(f"{where}: {type(err).__name__}: {err}")


@pytest.mark.parametrize("words", [["encoders"], ["datasets"], ["sweep", "--list"], ["--version"]])
def test_documented_commands_without_data_run(words, capsys):
    assert main(words) == 0
    assert capsys.readouterr().out.strip()


def test_every_python_snippet_compiles():
    count = 0
    for page, block in _blocks({"python", "py"}):
        compile(block, f"{page.name} snippet", "exec")
        count += 1
    assert count >= 3


def test_dotted_names_in_the_docs_exist():
    missing = []
    for page in PAGES:
        for name in set(re.findall(r"`(pipeline(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`", page.read_text())):
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    target = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        target = getattr(target, attr)
                except AttributeError:
                    missing.append(f"{page.name}: {name}")
                break
            else:
                missing.append(f"{page.name}: {name}")
    assert not missing, missing


@pytest.mark.slow
def test_the_api_page_runs_as_written(tmp_path, coco128):
    """docs/api.md's example, run in a fresh folder with ../shared beside it (as in a checkout)."""
    snippet = next(block for page, block in _blocks({"python"}) if page.name == "api.md")
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(coco128.parents[1])
    (work / "snippet.py").write_text(snippet)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "snippet.py"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "novel-class mIoU" in done.stdout
    shutil.rmtree(work / "cache", ignore_errors=True)


def test_the_api_page_trains_and_scores_on_disjoint_photos(tmp_path, monkeypatch, coco128):
    """docs/api.md's example run against recording stand-ins of the API: the training extraction, the
    scored one and the predicted photo read disjoint lists (scoring on training photos measures memory)."""
    import numpy as np

    import pipeline

    snippet = next(block for page, block in _blocks({"python"}) if page.name == "api.md")
    calls: dict[str, list[dict]] = {}

    def recorder(name, result):
        return lambda **kwargs: (calls.setdefault(name, []).append(kwargs), result)[1]

    for name, result in (("extract", {}), ("train", {"steps": 1, "final_loss": 0.5}),
                         ("evaluate", {"miou": 1.0, "episodes": 1}),
                         ("predict", {"label_map": np.zeros(1), "probabilities": np.zeros(1), "coverage": {}})):
        monkeypatch.setattr(pipeline, name, recorder(name, result))
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(coco128.parents[1])
    monkeypatch.chdir(work)
    exec(compile(snippet, "docs/api.md", "exec"), {})
    lists = {}
    for call in calls["extract"]:
        listed = (work / call["dataset_options"]["list_file"]).read_text().split()
        lists[call.get("split", "train")] = set(listed)
    assert lists["train"] and lists["val"] and not lists["train"] & lists["val"]
    assert calls["evaluate"][0]["split"] == "folder/val"
    assert Path(calls["predict"][0]["image"]).stem in lists["val"]


def test_the_datasets_page_says_where_to_get_each_dataset_and_the_commands_of_each_protocol():
    page = (ROOT / "docs" / "datasets.md").read_text()
    table = page[page.index("## Getting the data"):page.index("## One mask convention")]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for dataset in ("PASCAL VOC 2012", "SBD augmentation (for VOC training)", "COCO 2014", "FSS-1000"):
        cells = [c.strip() for c in rows[dataset].split("|")[2:5]]
        assert all(cells), dataset  # where to get it, the folder, the size
    assert re.search(r"\d", rows["COCO 2014"]) and "GB" in rows["PASCAL VOC 2012"]
    commands = [words for where, words in COMMANDS if where.startswith("datasets.md")]
    extracted = {words[words.index("--dataset") + 1] for words in commands if words[0] == "extract"}
    assert {"voc", "coco", "fss"} <= extracted
    trained = {words[words.index("--protocol") + 1] for words in commands if words[0] == "train"}
    assert {"pascal5i", "coco20i", "coco2voc"} <= trained
    guidance = page[page.index("### Your own data"):]
    for needle in ("--min-pixels", "novel_pixels", "list_file", "--eval-resize"):
        assert needle in guidance, needle


def test_product_docs_speak_of_the_product_not_of_issue_numbers():
    cited = [f"{page.name}: {line.strip()}" for page in PAGES for line in page.read_text().splitlines()
             if re.search(r"\bissues? #?\d+|\(issue\b", line, re.I)]
    assert not cited, cited


def test_the_training_config_table_lists_each_key_once():
    page = (ROOT / "docs" / "training.md").read_text()
    table = page[page.index("## The recipe and its config keys"):page.index("## Augmentation")]
    keys = [key for line in table.splitlines() if line.startswith("| `")
            for key in re.findall(r"`([a-z_.*]+)`", line.split("|")[1])]
    assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)


def test_the_readme_encoder_table_names_every_encoder():
    from pipeline.encode.registry import list_encoders

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Encoders"):]
    table = table[:table.index("\n\n", table.index("| name |"))]
    listed = set(re.findall(r"`([a-z0-9-]+)`", table))
    assert set(list_encoders()) <= listed, set(list_encoders()) - listed


def test_newcomer_timings_are_given_as_measured_with_the_machine():
    """How long the first steps take, as measured, on what machine under what load; no bare "~4 min"."""
    readme, quickstart = (ROOT / "README.md").read_text(), (ROOT / "docs" / "quickstart.md").read_text()
    for page in (readme, quickstart):
        said = page[page.index("make demo"):]
        assert re.search(r"measured on a fresh clone", said, re.I) and "load average" in said
        assert re.search(r"\d+ min \d+ s the first time|first\s+`make demo` took \d+ min \d+ s", said)
    coco = " ".join(quickstart[quickstart.index("--data-root ../shared/data/coco128"):].split())[:1200]
    assert re.search(r"took about \d+ minutes", coco) and "never trained on" in coco
    assert re.search(r"took about \d+ minutes", quickstart[quickstart.index("make test"):])
    assert "/demo-*/" in (ROOT / ".gitignore").read_text().split()


def test_every_test_file_the_docs_name_exists():
    """A test moved into its sub-package folder once left three pages pointing at files that were gone."""
    named = {(page.name, path) for page in PAGES for path in re.findall(r"tests/[\w/]+\.py", page.read_text())}
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).is_file())
    assert named and not missing, missing
