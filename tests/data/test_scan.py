"""Folder scanning (§10.1 with the §17 #23 fixes)."""

from __future__ import annotations

import pytest

from trainer.data.scan import scan_images
from trainer.errors import InputError

from .conftest import write_image


def test_recursive_case_insensitive_sorted_and_dotfiles_skipped(tmp_path):
    write_image(tmp_path / "b.png", (8, 8))
    write_image(tmp_path / "A.JPG", (8, 8), fmt="JPEG")
    write_image(tmp_path / "sub" / "c.WebP", (8, 8), fmt="WEBP")
    write_image(tmp_path / ".hidden.png", (8, 8))
    write_image(tmp_path / ".cache" / "d.png", (8, 8))
    (tmp_path / "notapng").write_bytes(b"x")  # no dot: not an image (the reference matched it)
    (tmp_path / "b.txt").write_text("caption")
    result = scan_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in result.images] == ["A.JPG", "b.png", "sub/c.WebP"]
    reasons = {p.name: why for p, why in result.skipped}
    assert reasons == {".hidden.png": "hidden file", ".cache": "hidden folder", "notapng": "not an image extension"}


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan_images(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = write_image(tmp_path / "x.png", (8, 8))
    with pytest.raises(InputError, match="not a folder"):
        scan_images(f)


def test_no_images_names_the_key(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match="lora_data_directory: no images found"):
        scan_images(tmp_path)


def test_kohya_repeat_folders_and_mask_files(tmp_path):
    write_image(tmp_path / "5_sks dog" / "a.png", (8, 8))
    write_image(tmp_path / "5_sks dog" / "a_mask.png", (8, 8))
    write_image(tmp_path / "0_x" / "b.png", (8, 8))
    write_image(tmp_path / "plain" / "c.png", (8, 8))
    write_image(tmp_path / "plain" / "lonely_mask.png", (8, 8))  # no partner image: an image like any other
    with_masks = scan_images(tmp_path, masks=True)
    names = [p.relative_to(tmp_path).as_posix() for p in with_masks.images]
    assert names == ["0_x/b.png", "5_sks dog/a.png", "plain/c.png", "plain/lonely_mask.png"]
    assert {k.name: v.name for k, v in with_masks.masks.items()} == {"a.png": "a_mask.png"}
    repeats = {p.name: with_masks.repeats(p) for p in with_masks.images}
    assert repeats == {"b.png": 1, "a.png": 5, "c.png": 1, "lonely_mask.png": 1}  # 0_x counts once, never skips
    assert with_masks.folder_class(tmp_path / "5_sks dog" / "a.png") == "sks dog"
    # masked_loss off: mask files are images, as before masked loss existed
    assert len(scan_images(tmp_path).images) == 5 and not scan_images(tmp_path).masks
