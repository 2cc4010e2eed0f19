"""Latent caching (§10.6, §10.9, §10.11 with the §17 #5, #6, #28, #52 fixes)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from trainer.data.cache import encode_pairs, encode_samples
from trainer.data.plan import plan_pairs, plan_samples

from .conftest import CountingEncoder

SMALL = {"size_hw": (64, 64), "bucket_step": 32, "min_length": 32, "max_ratio": 2}


def _images(tmp_path, n, size=(64, 64)):
    rng = np.random.default_rng(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_one_encode_call_per_batch(tmp_path, encoder):
    plan = plan_samples(_images(tmp_path, 5) + _images(tmp_path / "w", 2, (64, 32)), **SMALL)
    progress = []
    cached = encode_samples(plan, encoder, batch_size=2, on_progress=lambda d, t: progress.append((d, t)))
    assert sorted(encoder.calls) == sorted([2, 2, 1, 2])  # 5 squares in 3 batches, 2 wide ones in 1
    assert cached.counts() == {(64, 64): 5, (64, 32): 2}
    sq = cached.buckets[[b.bucket for b in cached.buckets].index((64, 64))]
    assert sq.latents.shape == (5, 4, 8, 8) and sq.latents.dtype == torch.float32 and sq.latents.device.type == "cpu"
    assert sq.masks.shape == (5, 1, 8, 8) and bool((sq.masks == 1).all())
    assert progress[-1] == (7, 7)
    batch = cached.gather(0, [1, 0])
    assert batch.latents.shape[0] == 2 and len(batch.captions) == 2


def test_latents_match_pixels_and_mirror(tmp_path, encoder):
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 64))  # white strip on the left
    img.save(tmp_path / "s.png")
    cached = encode_samples(plan_samples([tmp_path / "s.png"], mirroring=True, **SMALL), encoder)
    lat = cached.buckets[0].latents
    assert torch.allclose(lat[0, 0, :, :2], torch.ones(8, 2)) and torch.allclose(lat[0, 0, :, 2:], -torch.ones(8, 6))
    assert torch.equal(lat[1], lat[0].flip(-1))


def test_mirrored_alpha_mask_is_mirrored_along_width(tmp_path, encoder):
    img = Image.new("RGBA", (64, 64), (10, 200, 10, 255))
    img.paste((0, 0, 0, 0), (0, 0, 24, 64))  # left 24 px transparent
    img.save(tmp_path / "a.png")
    cached = encode_samples(plan_samples([tmp_path / "a.png"], mirroring=True, **SMALL), encoder)
    plain, mirrored = cached.buckets[0].masks
    assert plain.shape == (1, 8, 8)
    assert plain[0, :, :3].sum() == 0 and bool((plain[0, :, 3:] == 1).all())
    assert torch.equal(mirrored, plain.flip(-1))


def test_disk_cache_skips_encoding_and_tracks_changes(tmp_path, encoder):
    paths = _images(tmp_path / "d", 3)
    plan = plan_samples(paths, **SMALL)
    first = encode_samples(plan, encoder, cache_dir=tmp_path / "c", cache_key="vae-a")
    again = CountingEncoder()
    second = encode_samples(plan, again, cache_dir=tmp_path / "c", cache_key="vae-a")
    assert again.calls == [] and torch.equal(first.buckets[0].latents, second.buckets[0].latents)
    other_vae = CountingEncoder()
    encode_samples(plan, other_vae, cache_dir=tmp_path / "c", cache_key="vae-b")
    assert other_vae.calls == [3]
    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # edited file → its entry is stale
    edited = CountingEncoder()
    encode_samples(plan, edited, cache_dir=tmp_path / "c", cache_key="vae-a")
    assert edited.calls == [1]


def test_pairs_diff_mask_marks_exactly_the_changed_region(tmp_path, encoder):
    base = np.full((64, 64, 3), 120, dtype=np.uint8)
    Image.fromarray(base).save(tmp_path / "p.png")
    changed = base.copy()
    changed[16:32, 40:56] = 200  # one 16x16 block = latent cells rows 2-3, cols 5-6
    changed[0, 0] = 123  # sum of |diff| = 9 ≤ 10: below the threshold
    Image.fromarray(changed).save(tmp_path / "p_t.png")
    plan = plan_pairs([tmp_path / "p.png", tmp_path / "p_t.png"], diff_target_name="_t", mirroring=True, **SMALL)
    cached = encode_pairs(plan, encoder, batch_size=4)
    assert encoder.calls == [4]  # 2 pairs (plain + mirrored), both members in one call
    bucket = cached.buckets[0]
    expected = torch.zeros(1, 8, 8)
    expected[0, 2:4, 5:7] = 1
    assert torch.equal(bucket.masks[0], expected) and torch.equal(bucket.masks[1], expected.flip(-1))
    assert not torch.equal(bucket.orig_latents[0], bucket.targ_latents[0])
    assert bucket.orig_captions == ["", ""]
    batch = cached.gather(0, [1])
    assert batch.orig_latents.shape == (1, 4, 8, 8) and batch.masks.shape == (1, 1, 8, 8)


def test_sdxl_size_conditioning_keeps_each_samples_original_size_and_crop(tmp_path, encoder):
    """kohya: original = the file's (h, w), crop = top-left of the bucket crop in the resized image (for a
    mirrored sample, counted from the mirrored side), target = the bucket."""
    Image.new("RGB", (151, 61), (90, 30, 30)).save(tmp_path / "wide.png")
    plan = plan_samples([tmp_path / "wide.png"], mirroring=True, **SMALL)
    cached = encode_samples(plan, encoder)
    assert cached.buckets[0].bucket == (64, 32)
    # cover 64x32 keeping the ratio: height 61 → 32, width 151 · 32/61 = 79.2 → 79; centred crop 64 of 79
    resized_w = 151 * 32 // 61
    left = (resized_w - 64) // 2
    sizes = cached.gather(0, [0, 1]).size_ids
    assert sizes.tolist() == [[61, 151, 0, left, 32, 64], [61, 151, 0, resized_w - 64 - left, 32, 64]]
    assert left == 7 and resized_w - 64 - left == 8  # the mirrored crop really differs here


def test_cache_stays_on_the_cpu_and_gather_moves_one_batch(tmp_path, encoder):
    """data/cache.py's contract: the cache is CPU memory; only the batch of a step goes to the device
    (``meta`` stands in for a GPU: a tensor moved there is visibly not on the CPU)."""
    from trainer.data.cache import CachedData

    cached = encode_samples(plan_samples(_images(tmp_path, 3), **SMALL), encoder)
    batch = cached.gather(0, [2, 0], torch.device("meta"))
    assert batch.latents.device.type == batch.masks.device.type == "meta"
    assert batch.latents.shape == (2, 4, 8, 8)
    assert isinstance(cached, CachedData) and cached.buckets[0].latents.device.type == "cpu"


def test_pair_batches_carry_the_originals_size_conditioning(tmp_path, encoder):
    Image.new("RGB", (151, 61), (90, 30, 30)).save(tmp_path / "p.png")
    Image.new("RGB", (151, 61), (30, 30, 90)).save(tmp_path / "p_t.png")
    cached = encode_pairs(plan_pairs([tmp_path / "p.png", tmp_path / "p_t.png"], diff_target_name="_t", **SMALL), encoder)
    assert cached.gather(0, [0]).size_ids.tolist() == [[61, 151, 0, 7, 32, 64]]
def test_pairs_diff_mask_keeps_a_thin_change(tmp_path, encoder):
    # a 2 px line off the 8 px grid: nearest-resizing sampled pixels 0, 8, 16, ... and lost it entirely
    base = np.full((64, 64, 3), 120, dtype=np.uint8)
    Image.fromarray(base).save(tmp_path / "p.png")
    changed = base.copy()
    changed[10:30, 13:15] = 240
    Image.fromarray(changed).save(tmp_path / "p_t.png")
    plan = plan_pairs([tmp_path / "p.png", tmp_path / "p_t.png"], diff_target_name="_t", mirroring=False, **SMALL)
    mask = encode_pairs(plan, encoder).buckets[0].masks[0]
    expected = torch.zeros(1, 8, 8)
    expected[0, 1:4, 1] = 1  # rows 10-29 touch cells 1-3, columns 13-14 lie in cell 1
    assert torch.equal(mask, expected)
