"""Sample planning (§10.5, §10.7–10.9): buckets, sub-images, mirroring, upscale skip, bad files, pairs."""

from __future__ import annotations

import pytest

from trainer.data.plan import find_pairs, plan_pairs, plan_samples
from trainer.errors import InputError, SettingsError

from .conftest import write_image

README = {"size_hw": (768, 512), "bucket_step": 128, "min_length": 256, "max_ratio": 2}


def test_readme_sub_image_example(tmp_path):
    img = write_image(tmp_path / "a.png", (512, 640))
    plan = plan_samples([img], sub_image_num=3, **README)
    assert [(s.bucket, s.is_sub) for s in plan.samples] == [
        ((512, 640), False), ((384, 512), True), ((256, 384), True), ((384, 640), True)]
    assert plan.warnings == []


def test_one_image_three_subs_mirroring_gives_eight(tmp_path):
    img = write_image(tmp_path / "a.png", (512, 640))
    plan = plan_samples([img], sub_image_num=3, mirroring=True, **README)
    assert len(plan.samples) == 8
    assert sum(s.mirrored for s in plan.samples) == 4
    assert {s.bucket for s in plan.samples if s.mirrored} == {s.bucket for s in plan.samples if not s.mirrored}


def test_no_sub_buckets_warns_and_keeps_main(tmp_path):
    img = write_image(tmp_path / "a.png", (512, 512))
    plan = plan_samples([img], size_hw=(512, 512), bucket_step=256, min_length=512, max_ratio=2, sub_image_num=2)
    assert [s.bucket for s in plan.samples] == [(512, 512)]
    assert any("no sub buckets" in w for w in plan.warnings)


def test_more_subs_than_sub_buckets_revisits(tmp_path):
    img = write_image(tmp_path / "a.png", (1024, 1024))
    plan = plan_samples([img], size_hw=(1024, 1024), bucket_step=256, min_length=512, max_ratio=2,
                        sub_image_num=6)
    subs = [s.bucket for s in plan.samples if s.is_sub]
    assert len(subs) == 6 and set(subs) == {(512, 768), (768, 768), (512, 512), (768, 512)}


def test_disable_upscale_skips_small_frames(tmp_path):
    small = write_image(tmp_path / "small.png", (300, 300))
    big = write_image(tmp_path / "big.png", (600, 600))
    plan = plan_samples([small, big], disable_upscale=True, sub_image_num=1, **README)
    by_name = {(s.path.name, s.bucket) for s in plan.samples}
    # small: main (512,512) and its closest sub (384,384) would both enlarge it, so it yields nothing
    assert by_name == {("big.png", (512, 512)), ("big.png", (384, 384))}
    assert any("image_disable_upscale" in w and "small.png" in w for w in plan.warnings)


def test_bad_files_skipped_with_warning_good_ones_kept(tmp_path):
    good = write_image(tmp_path / "good.png", (512, 512))
    (tmp_path / "zero.png").write_bytes(b"")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(write_image(tmp_path / "t.png", (64, 64)).read_bytes()[:50])
    plan = plan_samples([good, tmp_path / "zero.png", trunc], **README)
    assert [s.path for s in plan.samples] == [good]
    assert len(plan.warnings) == 2 and all("skipped" in w for w in plan.warnings)


def test_all_bad_raises_input_error_naming_the_folder_key(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputError) as info:
        plan_samples([tmp_path / "zero.png"], **README)
    assert info.value.path == "lora_data_directory"


def test_captions_num_multiply_and_counts(tmp_path):
    img = write_image(tmp_path / "red_cat.png", (512, 768))
    plan = plan_samples([img], trigger="sks", use_filename_as_tag=True, num_multiply=3, **README)
    assert plan.samples[0].caption == "sks,red,cat" and plan.num_multiply == 3
    assert plan.bucket_counts()[(512, 768)] == 1 and plan.bucket_counts()[(384, 768)] == 0
    assert plan.tag_frequency() == {"sks": 1, "red": 1, "cat": 1}


def test_crop_corner_for_sdxl_accounts_for_mirror(tmp_path):
    img = write_image(tmp_path / "w.png", (800, 512))  # ratio 1.56 → (768,512), crop 16 px off each side
    plan = plan_samples([img], mirroring=True, **README)
    plain, mirrored = plan.samples
    assert plain.bucket == (768, 512) and plain.crop_left_top == (16, 0) and mirrored.crop_left_top == (16, 0)
    img2 = write_image(tmp_path / "w2.png", (801, 512))
    a, b = plan_samples([img2], mirroring=True, **README).samples
    assert a.crop_left_top[0] + b.crop_left_top[0] == 801 - 768


def test_pairs_with_different_target_extension(tmp_path):
    o = write_image(tmp_path / "x.png", (640, 512))
    t = write_image(tmp_path / "x_after.jpg", (600, 520), fmt="JPEG")
    lone = write_image(tmp_path / "lonely.png", (64, 64))
    plan = plan_pairs([lone, o, t], diff_target_name="_after", mirroring=True, sub_image_num=1, **README)
    assert len(plan.pairs) == 4
    for pair in plan.pairs:
        assert pair.orig.path == o and pair.targ.path == t
        assert (pair.orig.bucket, pair.orig.mirrored, pair.orig.is_sub, pair.orig.image_size) == \
               (pair.targ.bucket, pair.targ.mirrored, pair.targ.is_sub, pair.targ.image_size)
        assert pair.orig.image_size == (600, 512)
    assert any("lonely.png" in w for w in plan.warnings)


def test_pairs_prefer_same_extension_and_warn_on_ambiguity(tmp_path):
    o = write_image(tmp_path / "x.png", (64, 64))
    t_png = write_image(tmp_path / "x_t.png", (64, 64))
    t_jpg = write_image(tmp_path / "x_t.jpg", (64, 64), fmt="JPEG")
    pairs, warnings = find_pairs([o, t_jpg, t_png], "_t")
    assert pairs == [(o, t_png)] and "several targets" in warnings[0]


def test_empty_target_name_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError) as info:
        plan_pairs([write_image(tmp_path / "x.png", (64, 64))], diff_target_name="", **README)
    assert info.value.key == "diff_target_name"


def test_no_pairs_is_an_input_error_with_the_fix(tmp_path):
    with pytest.raises(InputError, match="x_after.png"):
        plan_pairs([write_image(tmp_path / "x.png", (64, 64))], diff_target_name="_after", **README)
