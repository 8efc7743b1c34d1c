"""Dataset faults refused in one line (issue 14 item 6, part)."""

from __future__ import annotations

import pytest
from synthetic_data import sideways_photo, write_folder_dataset

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


def test_an_exif_rotated_photo_is_read_upright_and_its_mask_drawn_on_the_displayed_image(tmp_path):
    """Masks are drawn on the image as shown (annotation tools show it upright): one reads with the other."""
    import numpy as np
    from PIL import Image, ImageOps

    root = write_folder_dataset(tmp_path / "data")
    dataset = create_dataset("folder", root=root)
    image_path, mask_path = dataset.image_path(0), dataset.mask_path(0)
    image_path.unlink()
    image_path = sideways_photo(image_path.with_suffix(".jpg"))  # stored 64 wide x 40 high, shown 40 x 64
    with Image.open(image_path) as stored:
        shown = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    assert shown.shape == (64, 40, 3)
    mask = np.zeros((64, 40), np.uint8)
    mask[:20] = 1  # the top of the photo as shown
    Image.fromarray(mask).save(mask_path)
    dataset = create_dataset("folder", root=root)
    assert dataset.image_size(0) == (64, 40)  # planning sees the shown size, from the header alone
    record = dataset.load(0)
    assert np.array_equal(record.image, shown) and np.array_equal(record.mask, mask)

    Image.fromarray(mask.T.copy()).save(mask_path)  # a mask in the stored grid: refused, saying why
    with pytest.raises(UserError, match=r"mask size 64x40 is the stored grid of image .*EXIF orientation shows as "
                                        r"40x64; masks are read on the image as shown") as err:
        create_dataset("folder", root=root).load(0)
    assert "\n" not in str(err.value)


def test_coco_annotations_stay_in_the_stored_grid_of_an_exif_rotated_photo(tmp_path):
    """COCO json gives each image's size in the stored grid, and its polygons are drawn there."""
    from synthetic_data import make_coco

    root = make_coco(tmp_path / "coco")
    dataset = create_dataset("coco", root=root, split="val")
    path = dataset.image_path(0)
    height, width = dataset.load(0).image.shape[:2]
    sideways_photo(path, height=height, width=width)
    dataset = create_dataset("coco", root=root, split="val")
    assert dataset.image_size(0) == (height, width) and dataset.load(0).image.shape[:2] == (height, width)


@pytest.mark.parametrize("reader", ["dataset", "predict"])
def test_an_image_over_the_pixel_limit_is_one_line_with_its_size_and_how_to_allow_it(tmp_path, monkeypatch, reader):
    from PIL import Image

    from pipeline.eval.predict import read_photo

    root = write_folder_dataset(tmp_path / "data")
    path = create_dataset("folder", root=root).image_path(3)  # 90 x 70 = 6,300 pixels
    read = (lambda: create_dataset("folder", root=root).load(3)) if reader == "dataset" else lambda: read_photo(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setenv("FUSIONER_MAX_IMAGE_PIXELS", "3000")  # stands for Pillow's 89 M limit and a 20000 x 20000 photo
    with pytest.raises(UserError, match=r"6300 pixels.*set FUSIONER_MAX_IMAGE_PIXELS to its pixel count") as err:
        read()
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    monkeypatch.setenv("FUSIONER_MAX_IMAGE_PIXELS", "7000")
    assert read() is not None  # allowed
