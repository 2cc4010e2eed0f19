"""Open one image safely: EXIF orientation applied, every PIL mode turned into RGB + optional alpha mask."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError

# §10.6: a pixel counts as present when alpha > 10 % of full scale.
ALPHA_THRESHOLD = 0.1 * 255


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image.

    Attributes:
        rgb: the picture in mode ``RGB``, upright.
        alpha_mask: ``bool`` array (height, width), True where alpha > 10 %; ``None`` when the image has no
            transparency (or is fully opaque).
    """

    rgb: Image.Image
    alpha_mask: np.ndarray | None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.rgb.size


def open_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode ``path`` fully and close the file.

    Args:
        path: an image file.

    Returns:
        A :class:`LoadedImage`.

    Raises:
        InputError: if the file is missing, empty, truncated or not an image PIL can read.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, inside the try
            upright = ImageOps.exif_transpose(im)
            rgb, alpha = _split_alpha(upright if upright is not None else im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL signals bad files with OSError (incl. UnidentifiedImageError), SyntaxError (some plugins)
        # and ValueError; none of them should abort a whole dataset.
        raise InputError(str(path), f"cannot read this image ({err}); re-save it or remove it from the folder") from err
    return LoadedImage(rgb, alpha)


def _split_alpha(im: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """Return (RGB image, alpha mask or None) for any PIL mode."""
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")  # palette transparency (tRNS) becomes a real alpha channel
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    if im.mode in ("RGBa", "La"):
        im = im.convert("LA" if im.mode == "La" else "RGBA")  # premultiplied alpha: un-premultiply
    if im.mode in ("RGBA", "LA"):
        alpha = np.asarray(im.getchannel("A")) > ALPHA_THRESHOLD
        return im.convert("RGB"), (None if alpha.all() else alpha)
    return im.convert("RGB"), None


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float grey images into 0–255 (PIL's own convert clips instead)."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0  # floats are usually 0–1
    else:
        scale = 1.0 / 257.0 if arr.size and arr.max() > 255 else 1.0  # 16-bit data in a wide mode
    arr = np.nan_to_num(arr * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
