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


def test_a_16_bit_greyscale_image_is_scaled_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline.eval.predict import read_photo

    root = write_folder_dataset(tmp_path / "data")
    dataset = create_dataset("folder", root=root)
    path = dataset.image_path(0)
    height, width = dataset.load(0).image.shape[:2]
    ramp = np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)
    Image.fromarray(ramp).save(path.with_suffix(".png"))
    path.unlink()
    dataset = create_dataset("folder", root=root)
    for image in (dataset.load(0).image, read_photo(path.with_suffix(".png"))):
        assert image.dtype == np.uint8 and image.shape == (height, width, 3)
        assert np.array_equal(image[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
        assert (image == 255).mean() < 0.01  # PIL's own RGB conversion made ~99.8 % of it white


def test_an_image_without_a_mask_is_left_out_with_a_note(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data")
    paired = len(create_dataset("folder", root=root).ids)
    assert "no mask" not in capsys.readouterr().err
    next((root / "masks").glob("*.png")).unlink()
    dataset = create_dataset("folder", root=root)
    assert len(dataset.ids) == paired - 1
    err = capsys.readouterr().err
    assert "note: 1 image(s) in" in err and "have no mask" in err and err.count("\n") == 1
