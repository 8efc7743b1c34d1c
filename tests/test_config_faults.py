"""Config files that would hang or crash the reader are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_file, parse_override
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# Ten levels of ten aliases each: 10**10 values from ten lines.
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                 + [f"{chr(98 + n)}: &{chr(98 + n)} [{', '.join([f'*{chr(97 + n)}'] * 10)}]" for n in range(9)]) + "\n"


@pytest.mark.reliability
@pytest.mark.parametrize("text", [BOMB, "a: &a [*a]\n", "optim: &o {lr: 1}\nmore: *o\n"],
                         ids=["billion-laughs", "recursive", "plain-alias"])
def test_yaml_aliases_are_refused_in_one_line_at_once(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    script = ("import sys\nfrom pipeline.config import load_file\nfrom pipeline.errors import run_entry\n"
              f"sys.exit(run_entry(lambda: load_file({str(path)!r})))\n")
    # A subprocess with a deadline. The reader shared the aliased nodes, but every command then walked the
    # 10**10 values (merging, checking, saving config.json) for longer than 300 s, or recursed without end.
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "aliases (*" in done.stderr and "not accepted in configs" in done.stderr, done.stderr


def test_anchors_alone_and_overrides_still_read(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("optim: &o {lr: 1e-3}\n")
    assert load_file(path) == {"optim": {"lr": 1e-3}}
    assert parse_override("data.cache=*store") == ("data.cache", "*store")  # read as text, as before
    path.write_text("a: &x 1\nb: *x\n")
    with pytest.raises(UserError, match=r"config.yaml: not valid YAML \(aliases \(\*x\) are not accepted"):
        load_file(path)
