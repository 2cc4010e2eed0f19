"""Encode planned samples to latents once: batched per bucket, kept on the CPU, optionally cached on disk.

The reference encoded one image per VAE call and kept every latent on the GPU (§17 #28, #52). Here each
batch of same-bucket samples is one ``encode`` call, latents live on the CPU in float32 (the trainer
moves one batch at a time), and ``cache_dir`` lets a second run skip the VAE entirely.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..paths import atomic_write_bytes
from .buckets import Bucket
from .pixels import diff_mask, load_frame, loss_mask, mask_to_latent, to_pixels
from .plan import DataPlan, PairPlan, PairSample, Sample

Encode = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


class _Items:
    """Per-item batcher facts read from ``samples`` (pairs have neither repeats nor reg flags)."""

    samples: list

    def item_repeats(self) -> list[int]:
        return [getattr(s, "repeats", 1) for s in self.samples]

    def item_is_reg(self) -> list[bool]:
        return [bool(getattr(s, "is_reg", False)) for s in self.samples]


@dataclass
class BucketData(_Items):
    """All cached samples of one bucket.

    Attributes:
        bucket: ``(width, height)`` in pixels.
        latents: float32 (N, C, h, w) on the CPU.
        masks: float32 (N, 1, h, w) loss weights in [0, 1]: the ``<stem>_mask`` file's grey level or
            the alpha channel (> 10 %), averaged per latent pixel; all ones for unmasked images.
        captions: N prompts.
        samples: the N planned samples (path, crop, mirror, repeats, reg flag).
    """

    bucket: Bucket
    latents: torch.Tensor
    masks: torch.Tensor
    captions: list[str]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class PairBucketData(_Items):
    """All cached pairs of one bucket (Multi-ADDifT); ``masks`` is the real per-pair diff mask."""

    bucket: Bucket
    orig_latents: torch.Tensor
    targ_latents: torch.Tensor
    masks: torch.Tensor
    orig_captions: list[str]
    targ_captions: list[str]
    pairs: list[PairSample]

    def __len__(self) -> int:
        return len(self.orig_captions)

    @property
    def samples(self) -> list[PairSample]:  # type: ignore[override]
        return self.pairs


def _size_ids(samples: list[Sample]) -> torch.Tensor:
    """(B, 6) float32: each sample's SDXL size conditioning (:attr:`~trainer.data.plan.Sample.size_ids`)."""
    return torch.tensor([s.size_ids for s in samples], dtype=torch.float32)


@dataclass
class Batch:
    """One training batch from a single bucket."""

    bucket: Bucket
    latents: torch.Tensor
    masks: torch.Tensor
    captions: list[str]
    samples: list[Sample]

    @property
    def is_reg(self) -> torch.Tensor:
        """bool (B,): which samples are regularization images."""
        return torch.tensor([bool(getattr(s, "is_reg", False)) for s in self.samples], dtype=torch.bool)

    @property
    def size_ids(self) -> torch.Tensor:
        """(B, 6) SDXL size conditioning per sample: original (h, w), crop (top, left), bucket (h, w)."""
        return _size_ids(self.samples)


@dataclass
class PairBatch:
    """One Multi-ADDifT batch from a single bucket; ``masks`` are the pairs' diff masks (B, 1, h, w)."""

    bucket: Bucket
    orig_latents: torch.Tensor
    targ_latents: torch.Tensor
    masks: torch.Tensor
    orig_captions: list[str]
    targ_captions: list[str]
    pairs: list[PairSample]

    @property
    def size_ids(self) -> torch.Tensor:
        """(B, 6) SDXL size conditioning of each pair (original and target share size, crop and mirror)."""
        return _size_ids([p.orig for p in self.pairs])


class _Counted:
    """Counts shared by :class:`CachedData` and :class:`CachedPairs` (what the batcher reads)."""

    buckets: list

    def item_counts(self) -> list[int]:
        """Items per bucket, in ``buckets`` order (the batcher's input)."""
        return [len(b) for b in self.buckets]

    def item_repeats(self) -> list[list[int]]:
        """Per bucket, each item's own repeats (kohya folders; 1 for pairs), before ``num_multiply``."""
        return [b.item_repeats() for b in self.buckets]

    def item_is_reg(self) -> list[list[bool]]:
        """Per bucket, which items are regularization images (none for pairs)."""
        return [b.item_is_reg() for b in self.buckets]

    def counts(self) -> dict[Bucket, int]:
        """``{bucket: items}`` for the start-of-run summary."""
        return {b.bucket: n for b, n in zip(self.buckets, self.item_counts(), strict=True)}


@dataclass
class CachedData(_Counted):
    """Encoded LoRA-mode data; ``buckets`` holds only non-empty buckets, in ratio order."""

    buckets: list[BucketData]
    num_multiply: int = 1

    def gather(self, bucket_index: int, indices: list[int], device: torch.device | str | None = None) -> Batch:
        """The items ``indices`` of bucket ``bucket_index`` as one batch, its tensors moved to ``device``
        (only this batch: the cache itself stays on the CPU)."""
        b, idx = self.buckets[bucket_index], torch.as_tensor(indices, dtype=torch.long)
        return Batch(b.bucket, b.latents[idx].to(device), b.masks[idx].to(device), [b.captions[i] for i in indices],
                     [b.samples[i] for i in indices])


@dataclass
class CachedPairs(_Counted):
    """Encoded Multi-ADDifT pairs; same interface as :class:`CachedData` for the batcher."""

    buckets: list[PairBucketData]
    num_multiply: int = 1

    def gather(self, bucket_index: int, indices: list[int], device: torch.device | str | None = None) -> PairBatch:
        """The pairs ``indices`` of bucket ``bucket_index`` as one batch on ``device`` (as :meth:`CachedData.gather`)."""
        b, idx = self.buckets[bucket_index], torch.as_tensor(indices, dtype=torch.long)
        return PairBatch(b.bucket, b.orig_latents[idx].to(device), b.targ_latents[idx].to(device), b.masks[idx].to(device),
                         [b.orig_captions[i] for i in indices], [b.targ_captions[i] for i in indices],
                         [b.pairs[i] for i in indices])


@dataclass
class PlannedBucket(_Items):
    """One bucket of a plan before encoding: what the batcher counts."""

    bucket: Bucket
    samples: list

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class PlannedCounts(_Counted):
    """A plan seen as the batcher sees encoded data, without encoding anything: the step count of
    ``train_epochs`` and the epoch summary shown before a run."""

    buckets: list[PlannedBucket]
    num_multiply: int = 1


def planned_counts(plan: DataPlan | PairPlan) -> PlannedCounts:
    """Group a plan's samples (or pairs) by bucket exactly as :func:`encode_samples` (:func:`encode_pairs`) do."""
    if isinstance(plan, PairPlan):
        groups = _group(plan.pairs, lambda p: p.orig.bucket)
    else:
        groups = _group(plan.samples, lambda s: s.bucket)
    return PlannedCounts([PlannedBucket(b, items) for b, items in groups.items()], plan.num_multiply)


def encode_samples(
    plan: DataPlan, encode: Encode, *, batch_size: int = 8, on_progress: Progress | None = None,
    cache_dir: str | os.PathLike[str] | None = None, cache_key: str = "",
) -> CachedData:
    """Encode every planned sample once.

    Args:
        plan: from :func:`~trainer.data.plan.plan_samples`.
        encode: pixels float32 (B, 3, H, W) in [-1, 1] on the CPU → latents (B, C, h, w); called once
            per batch. The caller moves pixels to its device/dtype (e.g. ``bundle.encode_images``).
        batch_size: samples per ``encode`` call.
        on_progress: called as ``on_progress(done, total)`` after every batch.
        cache_dir: folder for the disk cache; ``None`` disables it.
        cache_key: identifies the encoder (model + VAE); part of every cache entry's key, so a different
            VAE never reuses stale latents.

    Returns:
        :class:`CachedData`.

    Raises:
        InputError: if an image became unreadable after planning.
    """
    def load(sample: Sample) -> tuple[torch.Tensor, np.ndarray | None]:
        rgb, alpha = load_frame(sample)
        return to_pixels(rgb)[None], loss_mask(sample, alpha)

    records = _encode_all(_group(plan.samples, lambda s: s.bucket), load, _sample_key, encode,
                          batch_size, on_progress, cache_dir, cache_key)
    buckets = [
        BucketData(bucket, torch.cat([r["latents"] for r in recs]), torch.stack([r["mask"] for r in recs]),
                   [s.caption for s in items], items)
        for bucket, (items, recs) in records.items()
    ]
    return CachedData(buckets, plan.num_multiply)


def encode_pairs(
    plan: PairPlan, encode: Encode, *, batch_size: int = 8, on_progress: Progress | None = None,
    cache_dir: str | os.PathLike[str] | None = None, cache_key: str = "",
) -> CachedPairs:
    """Encode every planned pair once (original and target in the same ``encode`` call).

    Args:
        plan: from :func:`~trainer.data.plan.plan_pairs`.
        encode, batch_size, on_progress, cache_dir, cache_key: as in :func:`encode_samples`;
            ``batch_size`` counts pairs, so each call gets ``2 * batch_size`` images.

    Returns:
        :class:`CachedPairs` with the per-pair diff masks (§10.9, the mask the reference discarded).

    Raises:
        InputError: if an image became unreadable after planning.
    """
    def load(pair: PairSample) -> tuple[torch.Tensor, np.ndarray | None]:
        (orig, _), (targ, _) = load_frame(pair.orig), load_frame(pair.targ)
        return torch.stack([to_pixels(orig), to_pixels(targ)]), diff_mask(orig, targ)

    def key(pair: PairSample, extra: str) -> str:
        return _sample_key(pair.orig, extra + "|pair|" + _sample_key(pair.targ, extra))

    records = _encode_all(_group(plan.pairs, lambda p: p.orig.bucket), load, key, encode,
                          batch_size, on_progress, cache_dir, cache_key)
    buckets = []
    for bucket, (pairs, recs) in records.items():
        lat = torch.stack([r["latents"] for r in recs])  # (N, 2, C, h, w): [:, 0] orig, [:, 1] target
        buckets.append(PairBucketData(bucket, lat[:, 0], lat[:, 1], torch.stack([r["mask"] for r in recs]),
                                      [p.orig.caption for p in pairs], [p.targ.caption for p in pairs], pairs))
    return CachedPairs(buckets, plan.num_multiply)


def _group(items: Iterable, bucket_of: Callable) -> dict[Bucket, list]:
    """Items by bucket, buckets in ratio order (as the plan's bucket lists), items in plan order."""
    groups: dict[Bucket, list] = {}
    for item in items:
        groups.setdefault(bucket_of(item), []).append(item)
    return dict(sorted(groups.items(), key=lambda kv: (Fraction(*kv[0]), -kv[0][0] * kv[0][1])))


def _encode_all(groups, load, key_of, encode, batch_size, on_progress, cache_dir, cache_key):
    """Per bucket: records from the disk cache where present, the rest encoded ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    cache = _DiskCache(cache_dir) if cache_dir is not None else None
    report = on_progress or (lambda done, total: None)
    total, done, out = sum(len(v) for v in groups.values()), 0, {}
    for bucket, items in groups.items():
        keys = [key_of(it, cache_key) for it in items]
        recs = [cache.get(k) if cache else None for k in keys]
        todo = [i for i, r in enumerate(recs) if r is None]
        if len(todo) < len(items):
            done += len(items) - len(todo)
            report(done, total)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for i, rec in zip(chunk, _encode_chunk([items[i] for i in chunk], load, encode), strict=True):
                recs[i] = rec
                if cache:
                    cache.put(keys[i], rec)
            done += len(chunk)
            report(done, total)
        out[bucket] = (items, recs)
    return out


def _encode_chunk(items: list, load: Callable, encode: Encode) -> list[dict[str, torch.Tensor]]:
    """Load a chunk, run ONE encode call over all its images, split the latents back per item."""
    loaded = [load(it) for it in items]
    k = loaded[0][0].shape[0]  # images per item: 1 for samples, 2 for pairs
    pixels = torch.cat([px for px, _ in loaded])
    with torch.no_grad():
        latents = encode(pixels).detach().to("cpu", torch.float32)
    assert latents.shape[0] == pixels.shape[0], f"encode returned {latents.shape[0]} latents for {pixels.shape[0]}"
    latent_hw = tuple(latents.shape[-2:])
    return [{"latents": latents[i * k:(i + 1) * k], "mask": mask_to_latent(mask, latent_hw)}
            for i, (_, mask) in enumerate(loaded)]


def _sample_key(sample: Sample, extra: str) -> str:
    """Hash of what determines a latent: file identity (path, mtime, size), frame, mirror, encoder."""
    stat = sample.path.stat()
    ident = [str(sample.path.resolve()), stat.st_mtime_ns, stat.st_size, list(sample.bucket),
             sample.mirrored, list(sample.image_size), extra, "weights-v2"]  # v2: masks are area-averaged weights
    if sample.mask_path is not None:
        mstat = sample.mask_path.stat()
        ident += [str(sample.mask_path.resolve()), mstat.st_mtime_ns, mstat.st_size]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


class _DiskCache:
    """One small ``.pt`` file per entry, written atomically; unreadable entries count as misses."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            return None  # a torn or foreign file: re-encode and overwrite it (it is only a cache)

    def put(self, key: str, record: dict[str, torch.Tensor]) -> None:
        buf = io.BytesIO()
        torch.save({k: v.contiguous().clone() for k, v in record.items()}, buf)
        atomic_write_bytes(self.folder / f"{key}.pt", buf.getvalue())
