"""Turn a planned sample into VAE-ready pixels and its pixel-space masks (alpha, pair difference)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .buckets import resize_and_crop
from .images import open_image
from .plan import Sample

# §10.9: a pixel differs when the summed |orig - targ| over R, G, B (0–255 scale) exceeds this.
DIFF_THRESHOLD = 10


def load_frame(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode, resize, crop and mirror one sample exactly as planned.

    Args:
        sample: a planned :class:`~trainer.data.plan.Sample`.

    Returns:
        ``(rgb, alpha)``: ``uint8`` array (height, width, 3) of the bucket size, and a ``bool`` alpha
        mask of the same height/width, or ``None`` when the image is opaque.

    Raises:
        InputError: if the file cannot be read any more.
    """
    loaded = open_image(sample.path)
    rgb, alpha = loaded.rgb, _alpha_image(loaded.alpha_mask)
    if rgb.size != sample.image_size:  # pair member brought to the pair's common size (§10.9)
        rgb = rgb.resize(sample.image_size, Image.Resampling.LANCZOS)
        alpha = alpha.resize(sample.image_size, Image.Resampling.NEAREST) if alpha is not None else None
    rgb = resize_and_crop(rgb, sample.bucket)
    alpha = resize_and_crop(alpha, sample.bucket, Image.Resampling.NEAREST) if alpha is not None else None
    rgb_arr = np.array(rgb)  # a writable copy: torch.from_numpy warns on read-only PIL buffers
    alpha_arr = np.asarray(alpha) > 127 if alpha is not None else None
    if sample.mirrored:  # flip along the width axis for pixels AND mask (the reference flipped channels)
        rgb_arr = rgb_arr[:, ::-1]
        alpha_arr = alpha_arr[:, ::-1] if alpha_arr is not None else None
    return np.ascontiguousarray(rgb_arr), (np.ascontiguousarray(alpha_arr) if alpha_arr is not None else None)


def loss_mask(sample: Sample, alpha: np.ndarray | None) -> np.ndarray | None:
    """The per-pixel loss weight of a sample at its bucket size (``masked_loss``), float32 in [0, 1].

    A ``<stem>_mask`` file wins (its grey level is the weight: white learns, black is ignored; one of
    another size is first resized to the image); else the alpha channel (present = 1); else None.

    Args:
        sample: the planned sample.
        alpha: its bucket-sized alpha mask from :func:`load_frame` (already mirrored), or None.
    """
    if sample.mask_path is None:
        return None if alpha is None else alpha.astype(np.float32)
    grey = open_image(sample.mask_path).rgb.convert("L")
    if grey.size != sample.image_size:
        grey = grey.resize(sample.image_size, Image.Resampling.BILINEAR)
    arr = np.asarray(resize_and_crop(grey, sample.bucket, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr[:, ::-1] if sample.mirrored else arr)


def _alpha_image(mask: np.ndarray | None) -> Image.Image | None:
    """A bool mask as an ``L`` image (0/255) so it can share PIL's resize and crop."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L") if mask is not None else None


def to_pixels(rgb: np.ndarray) -> torch.Tensor:
    """``uint8`` (H, W, 3) → float32 (3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(127.5).sub(1.0)


def diff_mask(orig: np.ndarray, targ: np.ndarray) -> np.ndarray:
    """Pixels where a pair differs: sum over RGB of |orig - targ| > 10 (on 0–255).

    Args:
        orig: ``uint8`` (H, W, 3).
        targ: ``uint8`` (H, W, 3), same shape.

    Returns:
        ``bool`` array (H, W).
    """
    return np.abs(orig.astype(np.int16) - targ.astype(np.int16)).sum(axis=-1) > DIFF_THRESHOLD


def mask_to_latent(mask: np.ndarray | None, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Bring a pixel mask to the latent grid.

    Args:
        mask: ``bool`` (H, W) for a 0/1 mask (pair differences): a latent cell counts when ANY of its
            pixels is set (max-pooling; nearest kept one pixel per 8x8 cell, so a 1-3 px change vanished),
            float32 (H, W) for loss weights (averaged over each latent pixel's area, so a half-covered
            latent pixel weighs 0.5), or ``None`` for "everything counts".
        latent_hw: (height, width) of the latent.

    Returns:
        float32 (1, h, w), broadcastable over the latent channels (any family's channel count).
    """
    if mask is None:
        return torch.ones(1, *latent_hw)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    if mask.dtype == np.bool_:
        return F.adaptive_max_pool2d(t, latent_hw)[0]
    return F.interpolate(t, size=latent_hw, mode="area")[0]
