"""Dataset faults refused in one line (issue 14 item 6, part)."""

from __future__ import annotations

import pytest
from synthetic_data import write_folder_dataset

from pipeline.data.registry import create_dataset
from pipeline.errors import UserError

pytestmark = pytest.mark.reliability


def test_repeated_class_names_are_refused(tmp_path):
    root = write_folder_dataset(tmp_path / "data")
    (root / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(UserError, match=r"classes.txt: class names must be unique, repeated: cat") as err:
        create_dataset("folder", root=root)
    assert "\n" not in str(err.value)
