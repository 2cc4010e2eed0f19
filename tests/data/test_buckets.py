"""Bucket maths (§10.4, §10.5): the reference's worked examples, degenerate inputs, assignment, crop."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.data.buckets import assign_bucket, crop_geometry, make_buckets, resize_and_crop, upscale_needed
from trainer.errors import SettingsError

WORKED = [
    # (size_hw, step, min_length, max_ratio, main, sub) — §10.4, in the documented order
    ((768, 512), 128, 256, 2,
     [(384, 768), (512, 768), (512, 640), (512, 512), (640, 512), (768, 512), (768, 384)],
     [(256, 512), (384, 640), (256, 384), (384, 512), (384, 384), (256, 256), (512, 384), (384, 256),
      (640, 384), (512, 256)]),
    ((768, 512), 128, 512, 2, [(512, 768), (512, 640), (512, 512), (640, 512), (768, 512)], []),
    ((768, 512), 256, 512, 2, [(512, 768), (512, 512), (768, 512)], []),
    ((1024, 1024), 256, 512, 2,
     [(512, 1024), (768, 1024), (1024, 1024), (1024, 768), (1024, 512)],
     [(512, 768), (768, 768), (512, 512), (768, 512)]),
    ((512, 512), 256, 512, 2, [(512, 512)], []),
]


@pytest.mark.parametrize(("size", "step", "lmin", "ratio", "main", "sub"), WORKED)
def test_worked_examples_exact_order(size, step, lmin, ratio, main, sub):
    got_main, got_sub = make_buckets(size, step, lmin, ratio)
    assert got_main == main
    assert got_sub == sub


def test_size_order_does_not_matter():
    assert make_buckets((512, 768), 128, 256, 2) == make_buckets((768, 512), 128, 256, 2)


def test_min_length_above_size_gives_only_square():
    assert make_buckets((768, 512), 64, 1024, 2) == ([(512, 512)], [])


@pytest.mark.parametrize(("args", "key"), [
    (((512, 512), 0, 512, 2), "image_buckets_step"),
    (((512, 512), -64, 512, 2), "image_buckets_step"),
    (((512, 512), 1024, 512, 2), "image_buckets_step"),   # step > size: h would be 0
    (((768, 256), 512, 256, 2), "image_buckets_step"),    # step > short side: P/w < step
    (((512, 512), 64, 0, 2), "image_min_length"),
    (((512, 512), 64, 512, 0.5), "image_max_ratio"),
    (((512, 512), 64, 512, float("nan")), "image_max_ratio"),
    (((0, 512), 64, 512, 2), "image_size(height, width)"),
])
def test_degenerate_inputs_raise_naming_the_field(args, key):
    with pytest.raises(SettingsError) as info:
        make_buckets(*args)
    assert info.value.key == key
    assert "use" in info.value.message or "must" in info.value.message


@given(
    s1=st.integers(8, 640), s2=st.integers(8, 640), step=st.integers(-4, 256),
    lmin=st.integers(-4, 700), ratio=st.floats(0.25, 4.0),
)
@settings(max_examples=150, deadline=None)
def test_buckets_within_limits_or_settings_error(s1, s2, step, lmin, ratio):
    if step > 0 and max(s1, s2) // step > 80:  # keep the quadratic sub loop small for test speed
        step = max(s1, s2) // 80 + 1
    try:
        main, sub = make_buckets((s1, s2), step, lmin, ratio)
    except SettingsError:
        return
    lo, hi = sorted((s1, s2))
    assert (lo, lo) in main
    assert not set(main) & set(sub)
    for w, h in main + sub:
        assert 0 < w <= hi and 0 < h <= hi
        assert w * h <= lo * hi
        assert w <= ratio * h + 1e-9 and h <= ratio * w + 1e-9
    for lst in (main, sub):
        ratios = [Fraction(w, h) for w, h in lst]
        assert ratios == sorted(ratios) and len(set(lst)) == len(lst)


def test_assign_bucket_closest_ratio_and_signed_error():
    main, _ = make_buckets((768, 512), 128, 256, 2)
    assert assign_bucket(1000, 1000, main) == ((512, 512), 0)
    bucket, err = assign_bucket(1200, 800, main)  # 1.5
    assert bucket == (768, 512) and err == 0
    bucket, err = assign_bucket(1100, 1000, main)  # 1.1: between 1.0 and 1.25 → 1.0 (closer)
    assert bucket == (512, 512) and err == Fraction(1) - Fraction(11, 10)


def test_assign_bucket_tie_goes_to_first():
    buckets = [(512, 512), (768, 512)]  # ratios 1.0 and 1.5; 1.25 is equidistant
    assert assign_bucket(1250, 1000, buckets)[0] == (512, 512)


@pytest.mark.parametrize(("size", "bucket"), [((1000, 400), (768, 384)), ((300, 900), (384, 768)),
                                              ((512, 512), (640, 512)), ((77, 1333), (512, 512))])
def test_resize_and_crop_gives_bucket_size(size, bucket):
    out = resize_and_crop(Image.new("RGB", size), bucket)
    assert out.size == bucket


def test_crop_is_centred():
    img = Image.new("L", (300, 100), 0)
    img.paste(255, (100, 0, 200, 100))  # white middle third
    out = resize_and_crop(img, (100, 100))
    assert out.size == (100, 100) and np.asarray(out).min() == 255
    (new_size, corner) = crop_geometry(300, 100, (100, 100))
    assert new_size == (300, 100) and corner == (100, 0)
    assert crop_geometry(100, 300, (100, 200)) == ((100, 300), (0, 50))


def test_upscale_needed():
    assert upscale_needed(400, 400, (512, 512))
    assert not upscale_needed(1024, 512, (512, 512))
    assert upscale_needed(1024, 400, (512, 512))  # wide image fitted by height: 400 < 512
