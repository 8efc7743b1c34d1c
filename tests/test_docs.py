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


def test_every_test_file_the_docs_name_exists():
    """A test moved into its sub-package folder once left three pages pointing at files that were gone."""
    named = {(page.name, path) for page in PAGES for path in re.findall(r"tests/[\w/]+\.py", page.read_text())}
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).is_file())
    assert named and not missing, missing
