"""Find the training images under a folder: recursive, case-insensitive, dotfiles skipped, sorted."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

# Compared with the dot and case-insensitively: the reference's dot-less, case-sensitive test skipped
# "photo.JPG" and accepted "notapng" (§17 #23).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp", ".pcx", ".ico")
CAPTION_EXTENSIONS = (".txt", ".caption")
MASK_SUFFIX = "_mask"  # <stem>_mask.png beside <stem>.<ext> is a loss mask, not a training image
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya's "<repeats>_<name>" dataset folders


@dataclass(frozen=True)
class ScanResult:
    """What a folder scan found.

    Attributes:
        images: image files, sorted by their path relative to the root.
        skipped: ``(path, reason)`` for hidden entries and files that are not images (captions excluded).
    """

    images: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    root: Path | None = None
    masks: dict[Path, Path] = field(default_factory=dict)  # image -> its <stem>_mask file

    def repeats(self, image: Path) -> int:
        """kohya folder repeats of ``image``: the ``N`` of the first ``N_name`` folder under the root, else 1."""
        return folder_repeats(image, self.root) if self.root is not None else 1

    def folder_class(self, image: Path) -> str:
        """The ``name`` of the ``N_name`` folder holding ``image`` (kohya's class tokens), else ""."""
        return folder_class(image, self.root) if self.root is not None else ""


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with a known image extension (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def scan_images(root: str | os.PathLike[str], *, key: str = "lora_data_directory", masks: bool = False) -> ScanResult:
    """List the images under ``root``, recursively, in a deterministic order.

    Args:
        root: the dataset folder.
        key: the settings key to name in errors (the folder field of the calling mode).
        masks: ``masked_loss``: ``<stem>_mask`` files beside an image become its loss mask instead of
            training images (off: they are images like any other, as before masked loss existed).

    Returns:
        A :class:`ScanResult`.

    Raises:
        InputError: if ``root`` is missing, is not a folder, or holds no image.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise InputError(str(root_path), f"{key}: the folder does not exist; check the path")
    if not root_path.is_dir():
        raise InputError(str(root_path), f"{key}: this is a file, not a folder; give the folder holding the images")
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        here = Path(dirpath)
        for name in [d for d in dirnames if d.startswith(".")]:
            skipped.append((here / name, "hidden folder"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # prune in place: os.walk reads it
        for name in filenames:
            _classify(here / name, images, skipped)
    if not images:
        raise InputError(
            str(root_path),
            f"{key}: no images found; add files ending in {', '.join(IMAGE_EXTENSIONS)} (any case)",
        )
    found: dict[Path, Path] = {}
    if masks:
        images, found = _split_masks(images)
    rel = lambda p: p.relative_to(root_path).as_posix()  # noqa: E731 - sort key used twice
    return ScanResult(sorted(images, key=rel), sorted(skipped, key=lambda s: rel(s[0])), root_path, found)


def folder_repeats(image: str | os.PathLike[str], root: str | os.PathLike[str]) -> int:
    """Repeats from kohya's folder naming: ``root/3_cat/x.png`` repeats 3 times; other layouts 1.

    The outermost ``N_name`` folder counts (kohya puts one such level under the dataset root); ``0_x``
    counts as 1, not as "skip", so no image silently disappears.
    """
    for part in Path(image).relative_to(root).parts[:-1]:
        match = _REPEAT_DIR.match(part)
        if match:
            return max(int(match.group(1)), 1)
    return 1


def folder_class(image: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """The name of the outermost kohya ``N_name`` folder holding ``image`` (``3_sks dog`` → ``sks dog``), or ""."""
    for part in Path(image).relative_to(root).parts[:-1]:
        match = _REPEAT_DIR.match(part)
        if match:
            return match.group(2).strip()
    return ""


def _split_masks(images: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """Separate ``<stem>_mask.<ext>`` files that have a partner image; they weight its loss instead."""
    by_stem = {(p.parent, p.stem): p for p in images}
    masks: dict[Path, Path] = {}
    for p in images:
        if p.stem.endswith(MASK_SUFFIX):
            partner = by_stem.get((p.parent, p.stem[: -len(MASK_SUFFIX)]))
            if partner is not None:
                masks[partner] = p
    mask_files = set(masks.values())
    return [p for p in images if p not in mask_files], masks


def _classify(path: Path, images: list[Path], skipped: list[tuple[Path, str]]) -> None:
    """Append ``path`` to images or skipped; caption files are expected and not reported."""
    if path.name.startswith("."):
        skipped.append((path, "hidden file"))
    elif is_image_path(path):
        images.append(path)
    elif path.suffix.lower() not in CAPTION_EXTENSIONS:
        skipped.append((path, "not an image extension"))
