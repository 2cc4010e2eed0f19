"""Image opening (§10.2 with the §17 #23 fixes): EXIF, every PIL mode, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import open_image
from trainer.errors import InputError

from .conftest import write_image


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored landscape 40x20 with the left half red; orientation 6 = "rotate 90° clockwise to view".
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    loaded = open_image(path)
    assert loaded.size == (20, 40)
    arr = np.asarray(loaded.rgb).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60   # stored left (red) is now on top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16", "I", "F", "CMYK", "RGBA", "1", "RGB"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    img = Image.new(mode, (16, 12))
    path = tmp_path / ("x.tif" if mode in ("F", "CMYK", "I") else "x.png")
    img.save(path)
    loaded = open_image(path)
    assert loaded.rgb.mode == "RGB" and loaded.size == (16, 12)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    value = np.asarray(open_image(path).rgb)[0, 0, 0]
    assert 120 <= value <= 135


def test_alpha_mask_from_rgba_and_palette_transparency(tmp_path):
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 5, 10))
    img.save(tmp_path / "a.png")
    mask = open_image(tmp_path / "a.png").alpha_mask
    assert mask is not None and mask[:, :5].sum() == 0 and mask[:, 5:].all()
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.paste(1, (0, 0, 10, 5))
    pal.save(tmp_path / "p.png", transparency=0)
    pmask = open_image(tmp_path / "p.png").alpha_mask
    assert pmask is not None and pmask[:5].all() and not pmask[5:].any()
    write_image(tmp_path / "opaque.png", (10, 10), (1, 2, 3, 255), mode="RGBA")
    assert open_image(tmp_path / "opaque.png").alpha_mask is None


def test_bad_files_raise_input_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    good = write_image(tmp_path / "t.png", (64, 64), (9, 9, 9))
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    for name in ("zero.png", "junk.jpg", "trunc.png", "missing.png"):
        with pytest.raises(InputError) as info:
            open_image(tmp_path / name)
        assert name in info.value.path and "remove it" in info.value.message
