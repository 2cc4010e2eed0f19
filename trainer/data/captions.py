"""Captions (§10.3): filename tags, ``.txt`` / ``.caption`` side files, the trigger word, tag counts."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError

# The Image-tab augmenter appends "_id_<n>" to the stem; everything from there on is not a tag.
AUGMENT_SUFFIX = "_id_"


def filename_tags(stem: str) -> str:
    """Turn a file stem into tags: cut at the first ``_id_``, then every ``_`` becomes ``,``.

    Args:
        stem: the file name without its extension.

    Returns:
        The tag string, e.g. ``"1girl,red_hair_id_3"`` → ``"1girl,red,hair"``.
    """
    return stem.split(AUGMENT_SUFFIX, 1)[0].replace("_", ",")


def read_caption_file(path: str | os.PathLike[str]) -> str | None:
    """Read a caption side file as UTF-8 (a BOM is dropped) with surrounding whitespace stripped.

    Args:
        path: the ``.txt`` or ``.caption`` file.

    Returns:
        The text, or ``None`` if the file does not exist.

    Raises:
        InputError: if the file is not valid UTF-8 or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise InputError(str(path), f"caption is not UTF-8 text ({err.reason}); re-save it as UTF-8") from err
    except OSError as err:
        raise InputError(str(path), f"cannot read the caption ({err}); check its permissions") from err


def compose_caption(image_path: str | os.PathLike[str], trigger: str, use_filename_as_tag: bool) -> str:
    """Build the prompt for one image (§10.3 precedence).

    1. ``use_filename_as_tag`` → trigger + ``,`` + filename tags;
    2. else ``<stem>.txt`` → trigger + ``, `` + its text;
    3. else ``<stem>.caption`` → trigger + ``, `` + its text;
    4. else the trigger alone.

    An empty trigger gives just the text (the reference produced a leading ``", "``).

    Args:
        image_path: the image file; side files are looked up next to it.
        trigger: ``lora_trigger_word``; surrounding whitespace is ignored.
        use_filename_as_tag: ``image_use_filename_as_tag``.

    Returns:
        The caption string.

    Raises:
        InputError: if a caption file exists but is unreadable or not UTF-8.
    """
    image_path = Path(image_path)
    trigger = trigger.strip()
    if use_filename_as_tag:
        return _join(trigger, filename_tags(image_path.stem), ",")
    for ext in (".txt", ".caption"):
        text = read_caption_file(image_path.with_suffix(ext))
        if text is not None:
            return _join(trigger, text, ", ")
    return trigger


def _join(trigger: str, text: str, sep: str) -> str:
    """Join trigger and text, leaving out whichever is empty."""
    return sep.join(part for part in (trigger, text) if part)


def split_tags(caption: str) -> list[str]:
    """Split a caption on commas into stripped, non-empty tags."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Count tags over captions (feeds ``ss_tag_frequency``).

    Args:
        captions: one caption per stored sample.

    Returns:
        ``{tag: count}`` in first-seen order.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(split_tags(caption))
    return dict(counts)
