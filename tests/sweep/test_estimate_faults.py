"""`sweep --estimate --timings` refuses timings that would print nonsense (negative or zero rates)."""

from __future__ import annotations

import pickle

import pytest

from pipeline.errors import UserError
from pipeline.sweep.estimate import estimate_study

pytestmark = pytest.mark.reliability

GOOD = '{"preset": "tiny", "batch_size": 8, "steps_per_s": 4.0, "machine": "H100 test"}\n'


@pytest.mark.parametrize(("content", "message"), [
    (GOOD.replace("4.0", "-4.0"), "steps_per_s must be a positive number, got -4.0"),
    (GOOD.replace("4.0", "0"), "steps_per_s must be a positive number, got 0"),
    (GOOD.replace("4.0", "NaN"), "steps_per_s must be a positive number, got nan"),
    (GOOD.replace('"batch_size": 8', '"batch_size": 0'), "batch_size must be a whole number of at least 1, got 0"),
    ("garbage\n", "not the JSON line `python -m pipeline.bench gpu` prints"),
    ("", "not the JSON line"),
    ("[1, 2]\n", "not the JSON line"),
    (pickle.dumps({"steps_per_s": 4.0}), "not the JSON line"),
], ids=["negative", "zero", "nan", "batch-0", "garbage", "empty", "a-list", "a-pickle"])
def test_bad_timings_are_one_line_before_any_estimate(tmp_path, content, message):
    path = tmp_path / "gpu.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match="`timings` .*gpu.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        estimate_study(runs=[], gpu="h100", timings_file=path)


def test_missing_timings_file_is_one_line(tmp_path):
    from pipeline.sweep.estimate import read_timings

    with pytest.raises(UserError, match="gpu.json: file not found"):
        estimate_study(runs=[], gpu="h100", timings_file=tmp_path / "gpu.json")
    (tmp_path / "gpu.json").write_text(GOOD)
    assert read_timings(tmp_path / "gpu.json")["steps_per_s"] == 4.0
