"""Stage-one commands: one-line errors with exit code 2, `encoders`, `info`, `extract --help`."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_data import TINY_SIZES, with_bad_images, write_folder_dataset

from cli import main
from pipeline.encode.registry import list_encoders

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


def _extract_args(out: Path, *extra: str) -> list[str]:
    return ["extract", "--backbone", "test-vit", "--random-init", "--input-size", "32", "--out", str(out), *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("extra", "needle"), [
    (["--dataset", "folder", "--data-root", "{tmp}/absent"], "dataset root not found"),
    (["--dataset", "pascal-context", "--data-root", "{tmp}"], "unknown dataset reader 'pascal-context'"),
    (["--dataset", "folder", "--data-root", "{tmp}", "--views", "0"], "--views must be at least 1"),
])
@pytest.mark.reliability
def test_extract_mistakes_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    args = _extract_args(tmp_path / "out", *[e.format(tmp=tmp_path) for e in extra])
    assert main(args) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # nothing is created before the inputs are checked


def test_unknown_encoder_exits_2(tmp_path, capsys):
    args = ["extract", "--backbone", "vit-h", "--dataset", "folder", "--data-root", str(tmp_path), "--out",
            str(tmp_path / "out")]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "unknown encoder 'vit-h'" in err and "clip-l" in err


@pytest.mark.parametrize("make", ["missing", "empty", "plain-zarr"])
def test_info_on_something_that_is_not_a_store_exits_2(tmp_path, capsys, make):
    target = tmp_path / "thing"
    if make == "empty":
        target.mkdir()
    elif make == "plain-zarr":
        import zarr

        zarr.open_group(str(target), mode="w", zarr_format=3)
    assert main(["info", str(target)]) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and ("no feature store" in err or "not a Fusioner store" in err)


def test_encoders_lists_every_registered_encoder(capsys):
    assert main(["encoders"]) == 0
    table, _, forms = capsys.readouterr().out.strip().partition("\n\n")  # the registry, then the library forms
    lines = table.splitlines()
    assert "open_clip:ARCH[/TAG]" in forms and "timm:NAME" in forms and "hf:REPO" in forms
    assert lines[0].split()[:3] == ["name", "towers", "arch"]
    assert [line.split()[0] for line in lines[1:9]] == list_encoders() and len(lines) == 12
    # the tiny towers come last, each saying what it is for
    assert [line.split()[0] for line in lines[9:]] == ["test-text", "test-timm", "test-vit"]
    assert all("test-only: random-init" in line for line in lines[9:])


def test_extract_help_exits_0(capsys):
    assert main(["extract", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--backbone" in out and "--random-init" in out and "resumes" in out


def test_extract_then_info_describe_the_store(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", sizes=TINY_SIZES[:2])
    out = tmp_path / "store"
    args = _extract_args(out, "--dataset", "folder", "--data-root", str(data), "--views", "2", "--quiet")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"{out} folder/train: 4 views, 1 shards written, 0 already done" in captured.out
    assert f"{out} text: 3 class names embedded" in captured.out
    assert "random-init weights" in captured.err
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "encoder    test-vit  weights: random-init" in info
    assert "input      32 px, grid [2, 2], vision dim 32, text dim 32" in info
    assert "text       3 classes x 32 (32 prompt templates)" in info
    assert "split      folder/train: views, 2 images, 4 views, shards 1/1," in info


def test_extract_reports_skipped_bad_images(tmp_path, capsys):

    data, truncated, junk = with_bad_images(tmp_path)
    out = tmp_path / "store"
    assert main(_extract_args(out, "--dataset", "folder", "--data-root", str(data), "--vision-only", "--quiet")) == 2
    assert str(junk) in _one_line_error(capsys)
    assert main(_extract_args(out, "--dataset", "folder", "--data-root", str(data), "--vision-only", "--quiet",
                              "--skip-bad")) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad image(s):" in err and f"  img100: {truncated}" in err and f"  img101: {junk}" in err
    assert main(["info", str(out)]) == 0
    assert "skipped 2 bad image(s): img100, img101" in capsys.readouterr().out
