"""Captions (§10.3): filename tags, ``.txt`` / ``.caption`` side files, the trigger word, tag counts."""

from __future__ import annotations

import os
import random
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


class CaptionAugment:
    """kohya's caption controls, applied each time a sample is drawn: shuffle, keep, drop tags, drop all.

    The result depends only on ``(seed, rank, step, slot)`` — no state — so runs are reproducible and a
    resumed run draws the same captions as an uninterrupted one. The trigger word, when a caption starts
    with it, always stays first and is never dropped with a tag (only with the whole caption).

    Args:
        trigger: ``lora_trigger_word``.
        separator: ``caption_separator``; tags are split on it, stripped, and joined back with it plus a space.
        shuffle: ``shuffle_caption``.
        keep_tokens: ``keep_tokens``: this many leading tags (after the trigger) stay in place.
        dropout_rate: ``caption_dropout_rate``: chance of the empty caption.
        tag_dropout_rate: ``caption_tag_dropout_rate``: chance of dropping each tag after the kept ones.
        seed: the run seed.
        rank: the data-parallel rank (ranks draw different augmentations).
    """

    def __init__(self, *, trigger: str = "", separator: str = ",", shuffle: bool = False, keep_tokens: int = 0,
                 dropout_rate: float = 0.0, tag_dropout_rate: float = 0.0, seed: int = 0, rank: int = 0) -> None:
        self.trigger, self.separator = trigger.strip(), separator or ","
        self.shuffle, self.keep_tokens = shuffle, max(int(keep_tokens), 0)
        self.dropout_rate, self.tag_dropout_rate = float(dropout_rate), float(tag_dropout_rate)
        self.seed, self.rank = seed, rank

    @classmethod
    def from_settings(cls, s, seed: int, rank: int = 0) -> CaptionAugment:
        return cls(trigger=s.lora_trigger_word, separator=s.caption_separator, shuffle=bool(s.shuffle_caption),
                   keep_tokens=int(s.keep_tokens), dropout_rate=float(s.caption_dropout_rate),
                   tag_dropout_rate=float(s.caption_tag_dropout_rate), seed=seed, rank=rank)

    @property
    def active(self) -> bool:
        """False when every caption passes through unchanged (today's behaviour: cacheable encodings)."""
        return self.varies or self.dropout_rate > 0

    @property
    def varies(self) -> bool:
        """True when captions take more forms than 'as written' and 'empty' (encodings cannot be cached)."""
        return self.shuffle or self.tag_dropout_rate > 0

    def split(self, caption: str) -> tuple[list[str], list[str]]:
        """``(fixed, free)`` tags: the trigger and the first ``keep_tokens`` tags, then the rest."""
        tags = [t.strip() for t in caption.split(self.separator) if t.strip()]
        head = 1 if self.trigger and tags and tags[0] == self.trigger else 0
        cut = head + self.keep_tokens
        return tags[:cut], tags[cut:]

    def __call__(self, caption: str, step: int, slot: int = 0) -> str:
        """The caption fed to the text encoder for batch position ``slot`` of ``step``."""
        if not self.active:
            return caption
        rng = random.Random(f"traintrain-caption:{self.seed}:{self.rank}:{step}:{slot}")
        if self.dropout_rate > 0 and rng.random() < self.dropout_rate:
            return ""
        if not self.varies:
            return caption
        fixed, free = self.split(caption)
        if self.tag_dropout_rate > 0:
            free = [t for t in free if rng.random() >= self.tag_dropout_rate]
        if self.shuffle:
            rng.shuffle(free)
        return f"{self.separator} ".join(fixed + free) if self.separator.strip() else " ".join(fixed + free)

    def short_captions(self, captions: Iterable[str]) -> tuple[int, str | None]:
        """How many captions have no more tags than ``keep_tokens`` keeps (nothing is left to shuffle),
        and the first such caption, for the ``keep_tokens`` note."""
        if not self.keep_tokens or not self.varies:
            return 0, None
        short = [c for c in captions if not self.split(c)[1]]
        return len(short), (short[0] if short else None)
