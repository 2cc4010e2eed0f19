"""Plan the stored samples: main bucket, sub-images, mirror copies, captions; pairs for Multi-ADDifT.

Planning reads every image once (to know its upright size and to drop unreadable files early) but keeps
no pixels; :mod:`trainer.data.cache` loads and encodes them.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, SettingsError
from .buckets import Bucket, assign_bucket, crop_geometry, make_buckets, ratio_errors, upscale_needed
from .captions import compose_caption, tag_frequency
from .images import open_image
from .scan import is_image_path

DATA_KEY = "lora_data_directory"


@dataclass(frozen=True)
class Sample:
    """One stored training sample (an image placed in one bucket, maybe mirrored).

    Attributes:
        path: the image file.
        bucket: ``(width, height)`` the sample is cropped to.
        mirrored: flipped left-right after the crop.
        caption: the composed prompt (§10.3).
        is_sub: a down-scaled sub-image frame (§10.7) rather than the main bucket.
        image_size: ``(width, height)`` the image is brought to before bucketing: its own upright size,
            or a pair's common size (the loader resizes with Lanczos when they differ).
        repeats: kohya folder repeats (``3_cat/``) of this image, times ``reg_num_multiply`` for reg images;
            ``image_num_multiply`` is applied on top, to training images only, by the batcher.
        is_reg: a regularization image (its loss is weighted by ``prior_loss_weight``).
        mask_path: a ``<stem>_mask`` image weighting this sample's loss (``masked_loss``).
    """

    path: Path
    bucket: Bucket
    mirrored: bool
    caption: str
    is_sub: bool
    image_size: tuple[int, int]
    repeats: int = 1
    is_reg: bool = False
    mask_path: Path | None = None

    @property
    def crop_left_top(self) -> tuple[int, int]:
        """Crop corner in the resized image, in the sample's own (possibly mirrored) frame; for SDXL."""
        (new_w, _), (left, top) = crop_geometry(*self.image_size, self.bucket)
        return (new_w - self.bucket[0] - left if self.mirrored else left), top

    @property
    def size_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's size conditioning as kohya computes it: ``(original_h, original_w, crop_top, crop_left,
        target_h, target_w)``: the image's own size, where the bucket crop starts in the resized image
        (mirrored with the sample), and the bucket."""
        left, top = self.crop_left_top
        return self.image_size[1], self.image_size[0], top, left, self.bucket[1], self.bucket[0]


@dataclass(frozen=True)
class PairSample:
    """An (original, target) pair for Multi-ADDifT; both share bucket, crop and mirror, so they align."""

    orig: Sample
    targ: Sample


@dataclass
class DataPlan:
    """The samples to encode and what happened on the way.

    Attributes:
        samples: unique samples (``num_multiply`` repeats are applied by the batcher, not stored twice).
        main_buckets: the main bucket list used for assignment.
        sub_buckets: the sub bucket list used for sub-images.
        num_multiply: ``image_num_multiply``.
        warnings: one line per skipped file or notable event, for the console / UI.
    """

    samples: list[Sample]
    main_buckets: list[Bucket]
    sub_buckets: list[Bucket]
    num_multiply: int = 1
    warnings: list[str] = field(default_factory=list)

    def bucket_counts(self) -> dict[Bucket, int]:
        """Samples per bucket, every main and sub bucket listed (zeros included), in bucket order."""
        counts = Counter(s.bucket for s in self.samples)
        return {b: counts[b] for b in self.main_buckets + self.sub_buckets}

    def tag_frequency(self) -> dict[str, int]:
        """Tag counts over the training samples (feeds ``ss_tag_frequency``)."""
        return tag_frequency(s.caption for s in self.samples if not s.is_reg)

    def with_reg(self, reg: DataPlan) -> DataPlan:
        """This plan plus a regularization plan built with the same bucket settings."""
        assert reg.main_buckets == self.main_buckets and reg.sub_buckets == self.sub_buckets, "reg framing differs"
        return DataPlan(self.samples + reg.samples, self.main_buckets, self.sub_buckets, self.num_multiply,
                        self.warnings + [f"reg: {w}" for w in reg.warnings])


@dataclass
class PairPlan:
    """The pairs to encode for Multi-ADDifT (fields as in :class:`DataPlan`)."""

    pairs: list[PairSample]
    main_buckets: list[Bucket]
    sub_buckets: list[Bucket]
    num_multiply: int = 1
    warnings: list[str] = field(default_factory=list)

    def bucket_counts(self) -> dict[Bucket, int]:
        """Pairs per bucket, every bucket listed."""
        counts = Counter(p.orig.bucket for p in self.pairs)
        return {b: counts[b] for b in self.main_buckets + self.sub_buckets}


@dataclass(frozen=True)
class _Framing:
    """The bucket settings shared by every image of one plan."""

    main: list[Bucket]
    sub: list[Bucket]
    sub_image_num: int
    mirroring: bool
    disable_upscale: bool

    def frames(self, width: int, height: int) -> tuple[list[tuple[Bucket, bool, bool]], int]:
        """``[(bucket, is_sub, mirrored)]`` for an image, and how many frames upscaling ruled out."""
        bucket, _ = assign_bucket(width, height, self.main)
        wanted = [(bucket, False)] + [(b, True) for b in _sub_frames(width, height, self.sub, self.sub_image_num)]
        kept = [f for f in wanted if not (self.disable_upscale and upscale_needed(width, height, f[0]))]
        mirrors = (False, True) if self.mirroring else (False,)
        return [(b, sub, m) for b, sub in kept for m in mirrors], len(wanted) - len(kept)


def _sub_frames(width: int, height: int, subs: list[Bucket], num: int) -> list[Bucket]:
    """Pick ``num`` sub buckets (§10.7): the closest ratio first, each visit adding 1 to its error.

    The penalty is added to |error| (the reference added it to the signed error, so a bucket with error
    -0.8 dropped to 0.2 and was picked again at once); for the usual small errors the two agree.
    """
    if not subs or num <= 0:
        return []
    scores = [abs(e) for e in ratio_errors(width, height, subs)]
    picked = []
    for _ in range(num):
        i = min(range(len(subs)), key=scores.__getitem__)  # first index wins ties, like the reference
        picked.append(subs[i])
        scores[i] += 1
    return picked


def _make_framing(
    size_hw: tuple[int, int], bucket_step: int, min_length: int, max_ratio: float,
    sub_image_num: int, mirroring: bool, disable_upscale: bool, num_multiply: int, warnings: list[str],
) -> _Framing:
    """Validate the counts, build the buckets, and note when sub-images cannot be made."""
    if sub_image_num < 0:
        raise SettingsError("sub_image_num", f"{sub_image_num} must be 0 or more")
    if num_multiply < 1:
        raise SettingsError("image_num_multiply", f"{num_multiply} must be 1 or more")
    main, sub = make_buckets(size_hw, bucket_step, min_length, max_ratio)
    if sub_image_num > 0 and not sub:
        warnings.append(
            "sub_image_num: no sub buckets exist for these settings, so no sub-images are made; "
            "lower image_min_length or image_buckets_step to get smaller frames"
        )
    return _Framing(main, sub, sub_image_num, mirroring, disable_upscale)


def plan_samples(
    images: Sequence[str | os.PathLike[str]], *, size_hw: tuple[int, int], bucket_step: int, min_length: int,
    max_ratio: float, sub_image_num: int = 0, mirroring: bool = False, disable_upscale: bool = False,
    num_multiply: int = 1, trigger: str = "", use_filename_as_tag: bool = False,
    repeats: Callable[[Path], int] | None = None, masks: Mapping[Path, Path] | None = None, is_reg: bool = False,
) -> DataPlan:
    """Plan the LoRA-mode samples for a list of image files.

    Args:
        images: image files (usually ``scan_images(...).images``).
        size_hw: ``image_size`` (height, width).
        bucket_step: ``image_buckets_step``.
        min_length: ``image_min_length``.
        max_ratio: ``image_max_ratio``.
        sub_image_num: ``sub_image_num``, extra down-scaled frames per image.
        mirroring: ``image_mirroring``, add a flipped copy of every frame.
        disable_upscale: ``image_disable_upscale``, drop frames that would enlarge the image.
        num_multiply: ``image_num_multiply``, repeats per epoch (recorded, applied by the batcher).
        trigger: ``lora_trigger_word``.
        use_filename_as_tag: ``image_use_filename_as_tag``.
        repeats: per-image repeats (kohya ``N_name`` folders, ``ScanResult.repeats``); None = 1 each.
        masks: ``{image: mask file}`` (``ScanResult.masks``); a mask of another size is noted and resized.
        is_reg: these are regularization images.

    Returns:
        A :class:`DataPlan`; unreadable files are listed in ``warnings``.

    Raises:
        SettingsError: for degenerate bucket settings or negative counts.
        InputError: (``lora_data_directory``) when no sample is left.
    """
    warnings: list[str] = []
    framing = _make_framing(size_hw, bucket_step, min_length, max_ratio, sub_image_num, mirroring,
                            disable_upscale, num_multiply, warnings)
    samples: list[Sample] = []
    too_small: list[str] = []
    for raw in images:
        path = Path(raw)
        try:
            size = open_image(path).size
            caption = compose_caption(path, trigger, use_filename_as_tag)
        except InputError as err:
            warnings.append(f"skipped {err}")
            continue
        frames, dropped = framing.frames(*size)
        if dropped:
            too_small.append(path.name)
        mask = _checked_mask(path, size, (masks or {}).get(path), warnings)
        reps = repeats(path) if repeats is not None else 1
        samples += [Sample(path, b, m, caption, sub, size, reps, is_reg, mask) for b, sub, m in frames]
    _note_upscale(too_small, warnings)
    if not samples:
        raise InputError(DATA_KEY, f"no usable images among {len(images)} file(s); {_why(warnings)}")
    return DataPlan(samples, framing.main, framing.sub, num_multiply, warnings)


def _checked_mask(image: Path, size: tuple[int, int], mask: Path | None, warnings: list[str]) -> Path | None:
    """The mask file if it is readable; a mask of another size is kept (the loader resizes it) and noted."""
    if mask is None:
        return None
    try:
        mask_size = open_image(mask).size
    except InputError as err:
        warnings.append(f"masked_loss: {mask.name} is unreadable ({err.message}); {image.name} trains unmasked")
        return None
    if mask_size != size:
        warnings.append(f"masked_loss: {mask.name} is {mask_size[0]}x{mask_size[1]} but {image.name} is "
                        f"{size[0]}x{size[1]}; the mask is resized to the image (save it at the image's size to "
                        "silence this)")
    return mask


def _note_upscale(names: list[str], warnings: list[str]) -> None:
    """One summary line for frames dropped by ``image_disable_upscale``."""
    if names:
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        warnings.append(f"image_disable_upscale: {len(names)} image(s) too small for some of their buckets ({shown})")


def _why(warnings: list[str]) -> str:
    """The fix hint for an empty plan."""
    if warnings:
        return "problems: " + "; ".join(warnings[:3]) + " — fix or remove those files, or untick image_disable_upscale"
    return "add readable .png/.jpg/.webp images to lora_data_directory"


def find_pairs(
    images: Sequence[str | os.PathLike[str]], diff_target_name: str
) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Match ``<stem><ext>`` with ``<stem><diff_target_name><ext2>`` in the same folder (§10.9).

    ``ext2`` may be any image extension (the reference required the same one); the same extension is
    preferred when several exist.

    Args:
        images: image files.
        diff_target_name: ``diff_target_name``, the suffix marking target images.

    Returns:
        ``(pairs, warnings)``: ``(original, target)`` paths in input order, and notes about ambiguous or
        unpaired files.

    Raises:
        SettingsError: if ``diff_target_name`` is empty (every image would pair with itself).
    """
    if not diff_target_name:
        raise SettingsError("diff_target_name", "is empty; set the suffix that marks target images, e.g. '_after'")
    by_stem: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    paths = [Path(p) for p in images if is_image_path(p)]
    for p in paths:
        by_stem[(p.parent, p.stem)].append(p)
    pairs, warnings, used = [], [], set()
    for p in paths:
        found = sorted(by_stem.get((p.parent, p.stem + diff_target_name), []), key=lambda t: t.suffix != p.suffix)
        if not found:
            continue
        if len(found) > 1:
            warnings.append(f"{p}: several targets ({', '.join(t.name for t in found)}); using {found[0].name}")
        pairs.append((p, found[0]))
        used.update((p, found[0]))
    unpaired = [p.name for p in paths if p not in used]
    if unpaired and pairs:
        warnings.append(f"{len(unpaired)} image(s) without a '{diff_target_name}' partner ignored: "
                        + ", ".join(unpaired[:5]) + (" …" if len(unpaired) > 5 else ""))
    return pairs, warnings


def plan_pairs(
    images: Sequence[str | os.PathLike[str]], *, diff_target_name: str, size_hw: tuple[int, int],
    bucket_step: int, min_length: int, max_ratio: float, sub_image_num: int = 0, mirroring: bool = False,
    disable_upscale: bool = False, num_multiply: int = 1, trigger: str = "", use_filename_as_tag: bool = False,
) -> PairPlan:
    """Plan the Multi-ADDifT pairs: both members brought to their common size, then framed identically.

    Args:
        images: image files (originals and targets together).
        diff_target_name: ``diff_target_name``.
        size_hw, bucket_step, min_length, max_ratio, sub_image_num, mirroring, disable_upscale,
            num_multiply, trigger, use_filename_as_tag: as in :func:`plan_samples`.

    Returns:
        A :class:`PairPlan`.

    Raises:
        SettingsError: for an empty ``diff_target_name`` or degenerate bucket settings.
        InputError: (``lora_data_directory``) when no readable pair exists.
    """
    pairs_found, warnings = find_pairs(images, diff_target_name)
    framing = _make_framing(size_hw, bucket_step, min_length, max_ratio, sub_image_num, mirroring,
                            disable_upscale, num_multiply, warnings)
    pairs: list[PairSample] = []
    too_small: list[str] = []
    for orig, targ in pairs_found:
        try:
            (ow, oh), (tw, th) = open_image(orig).size, open_image(targ).size
            captions = [compose_caption(p, trigger, use_filename_as_tag) for p in (orig, targ)]
        except InputError as err:
            warnings.append(f"skipped pair {orig.name}: {err}")
            continue
        common = (min(ow, tw), min(oh, th))
        frames, dropped = framing.frames(*common)
        if dropped:
            too_small.append(orig.name)
        pairs += [PairSample(Sample(orig, b, m, captions[0], sub, common), Sample(targ, b, m, captions[1], sub, common))
                  for b, sub, m in frames]
    _note_upscale(too_small, warnings)
    if not pairs:
        example = Path(images[0]) if images else Path("photo.png")
        raise InputError(
            DATA_KEY,
            f"no usable pairs among {len(images)} image(s); put each original's target next to it, named with "
            f"the diff_target_name suffix '{diff_target_name}' (e.g. {example.name} → "
            f"{example.stem}{diff_target_name}{example.suffix}, any image extension)"
            + (f"; problems: {'; '.join(warnings[:3])}" if warnings else ""),
        )
    return PairPlan(pairs, framing.main, framing.sub, num_multiply, warnings)
