"""A crafted pickle given as weights is refused in one line that never advises loading it anyway."""

from __future__ import annotations

import pytest
import torch

from pipeline.encode.text import encoder_from_identity
from pipeline.errors import run_entry

pytestmark = pytest.mark.reliability


class RunsAShellCommand:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _crafted(path, marker):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsAShellCommand(marker)}, path)
    return path


def _one_line(capsys, call) -> str:
    code = run_entry(call)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(("encoder", "file"), [("clip-b", "clip.pt"), ("clip-l", "clip.bin"),
                                               ("clip-rn101", "rn101.pth"), ("bert-b", "bert/pytorch_model.bin")])
def test_a_crafted_weights_pickle_is_one_line_and_never_runs(tmp_path, capsys, encoder, file):
    from pipeline.encode.families import create_encoder

    marker, path = tmp_path / "ran", tmp_path / file
    path.parent.mkdir(exist_ok=True)
    _crafted(path, marker)
    given = path.parent if encoder == "bert-b" else path  # a BERT folder holds its pytorch_model.bin
    err = _one_line(capsys, lambda: create_encoder(encoder, weights=given))
    assert str(path) in err and "holds more than weights" in err and "posix.system" in err, err
    assert "weights_only=False" not in err and not marker.exists()


def test_weights_named_by_a_run_are_checked_the_same_way(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "clip.pt", marker)
    identity = {"encoder": "clip-b", "input_size": 224, "weights": {"pretrained": True, "source": str(path)}}
    err = _one_line(capsys, lambda: encoder_from_identity(identity, vision=True, text=False))
    assert "holds more than weights" in err and "weights_only=False" not in err and not marker.exists()


def test_plain_weights_pass_the_check(tmp_path):
    from pipeline.runtime import refuse_code_in_weights

    torch.save({"a": torch.zeros(2), "nested": {"b": torch.ones(1)}, "step": 3}, tmp_path / "ok.pt")
    refuse_code_in_weights(tmp_path / "ok.pt")
    refuse_code_in_weights(tmp_path)  # a folder of them
