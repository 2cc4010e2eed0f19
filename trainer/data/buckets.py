"""Aspect-ratio buckets: which frames exist, which frame an image goes to, and the resize + centre crop.

Buckets are ``(width, height)`` pixel pairs. Ratios are compared as exact fractions so ties (and the
README's sub-image example) do not depend on floating-point rounding.
"""

from __future__ import annotations

from fractions import Fraction

from PIL import Image

from ..errors import SettingsError

Bucket = tuple[int, int]


def make_buckets(
    size_hw: tuple[int, int], step: int, min_length: int, max_ratio: float
) -> tuple[list[Bucket], list[Bucket]]:
    """Build the main and sub bucket lists from the training size.

    Args:
        size_hw: ``image_size`` as (height, width); the order does not matter (it is sorted).
        step: ``image_buckets_step``, the granularity of bucket sides in pixels.
        min_length: ``image_min_length``, the shortest side the bucket loop starts from.
        max_ratio: ``image_max_ratio``, the largest allowed long/short side ratio (≥ 1).

    Returns:
        ``(main, sub)``: de-duplicated ``(width, height)`` lists sorted by ascending w/h; equal ratios
        are ordered largest area first. ``sub`` never contains a main bucket.

    Raises:
        SettingsError: for a step ≤ 0 or larger than the short side, a min length ≤ 0, a ratio < 1,
            or a non-positive size — inputs for which the reference hangs or divides by zero.
    """
    s1, s2 = sorted(int(v) for v in size_hw)
    _check_inputs(s1, s2, step, min_length, max_ratio)
    area = s1 * s2
    main: set[Bucket] = {(s1, s1)}
    for w in range(min_length, s2 + 1, step):
        q = area // w
        h = min(s2, q - q % step)
        if h <= 0:  # unreachable after _check_inputs (step ≤ s1 ≤ P/w); kept as an invariant
            raise SettingsError("image_buckets_step", f"{step} makes a bucket of height 0; use a smaller step")
        if _ratio_ok(w, h, max_ratio):
            main.update({(w, h), (h, w)})
    sub: set[Bucket] = set()
    sides = range(min_length, s2 + 1, step)
    for w in sides:
        for h in sides:
            if w * h <= area and _ratio_ok(w, h, max_ratio):
                sub.update(b for b in ((w, h), (h, w)) if b not in main)
    return _sorted(main), _sorted(sub)


def _check_inputs(s1: int, s2: int, step: int, min_length: int, max_ratio: float) -> None:
    """Reject the inputs that hang or divide by zero, naming the field and the fix."""
    if s1 <= 0:
        raise SettingsError("image_size(height, width)", f"{s1} must be a positive number of pixels, e.g. 512")
    if step <= 0:
        raise SettingsError("image_buckets_step", f"{step} must be a positive number of pixels; use e.g. 64 or 256")
    if step > s1:
        raise SettingsError(
            "image_buckets_step",
            f"{step} is larger than the short side of image_size ({s1}); use a step ≤ {s1} (e.g. 64)",
        )
    if min_length <= 0:
        raise SettingsError("image_min_length", f"{min_length} must be a positive number of pixels, e.g. 512")
    if not max_ratio >= 1:  # also catches NaN
        raise SettingsError("image_max_ratio", f"{max_ratio} must be ≥ 1 (long side / short side), e.g. 2")


def _ratio_ok(w: int, h: int, max_ratio: float) -> bool:
    """1/R ≤ w/h ≤ R, written without division so exact ratios like 2:1 are never lost to rounding."""
    return w <= max_ratio * h and h <= max_ratio * w


def _sorted(buckets: set[Bucket]) -> list[Bucket]:
    """Ascending ratio; equal ratios largest area first (matches the reference's printed examples)."""
    return sorted(buckets, key=lambda b: (Fraction(b[0], b[1]), -b[0] * b[1]))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> tuple[Bucket, Fraction]:
    """Pick the bucket whose ratio is closest to the image's.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        buckets: candidate buckets in their sorted order (ties go to the earlier one).

    Returns:
        ``(bucket, signed_error)`` with ``signed_error = bucket_ratio - image_ratio`` as an exact
        fraction: ≤ 0 means the image is relatively wider than the bucket.

    Raises:
        ValueError: if ``buckets`` is empty or the size is not positive (programmer error).
    """
    if not buckets or width <= 0 or height <= 0:
        raise ValueError(f"assign_bucket needs buckets and a positive size, got {width}x{height}, {buckets!r}")
    errors = ratio_errors(width, height, buckets)
    best = min(range(len(buckets)), key=lambda i: abs(errors[i]))  # min keeps the first on ties
    return buckets[best], errors[best]


def ratio_errors(width: int, height: int, buckets: list[Bucket]) -> list[Fraction]:
    """Signed ratio error ``bucket_ratio - image_ratio`` for every bucket, exactly."""
    image_ratio = Fraction(width, height)
    return [Fraction(bw, bh) - image_ratio for bw, bh in buckets]


def crop_geometry(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of ``width x height`` lands in ``bucket`` (§10.5).

    Args:
        width: image width in pixels.
        height: image height in pixels.
        bucket: target ``(width, height)``.

    Returns:
        ``((resized_w, resized_h), (left, top))``: the size the whole image is resized to, and the
        top-left corner of the centred bucket-sized crop in that resized image.
    """
    bw, bh = bucket
    if Fraction(bw, bh) <= Fraction(width, height):  # image relatively wider: match heights, crop width
        new_w = max(bw, width * bh // height)
        return (new_w, bh), ((new_w - bw) // 2, 0)
    new_h = max(bh, height * bw // width)  # image relatively taller: match widths, crop height
    return (bw, new_h), (0, (new_h - bh) // 2)


def resize_and_crop(
    img: Image.Image, bucket: Bucket, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Resize ``img`` to cover ``bucket`` keeping its aspect ratio, then take the centre crop.

    Args:
        img: the image (any mode; the mode is kept).
        bucket: target ``(width, height)``.
        resample: PIL filter; bicubic (PIL's default) for pictures, ``NEAREST`` for masks.

    Returns:
        An image of exactly ``bucket`` size.
    """
    (new_w, new_h), (left, top) = crop_geometry(img.width, img.height, bucket)
    resized = img if (new_w, new_h) == img.size else img.resize((new_w, new_h), resample)
    return resized.crop((left, top, left + bucket[0], top + bucket[1]))


def upscale_needed(width: int, height: int, bucket: Bucket) -> bool:
    """True when fitting the image into ``bucket`` enlarges it (``image_disable_upscale`` skips those)."""
    (new_w, new_h), _ = crop_geometry(width, height, bucket)
    return new_w > width or new_h > height
