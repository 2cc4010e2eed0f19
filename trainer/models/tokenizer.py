"""CLIP tokenizers built offline: the real OpenAI CLIP BPE (from the shipped merge list) and a tiny
character-level one for the built-in test models.

The real vocabulary is rebuilt from ``assets/bpe_simple_vocab_16e6.txt.gz`` the way OpenAI's tokenizer
builds it (256 byte symbols, the same with ``</w>``, 48,894 merges, then the two specials: 49,408 ids),
written once as ``vocab.json`` + ``merges.txt`` into a cache folder and loaded by transformers'
``CLIPTokenizer``. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from trainer.paths import atomic_write_text

BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Pad tokens: OpenAI CLIP (SD1, SDXL TE1) pads with EOS; OpenCLIP (SD2, SDXL TE2) pads with "!" (id 0).
PAD_CLIP = EOS
PAD_OPEN_CLIP = "!"
# A handful of merges so the tiny tokenizer exercises the BPE path, not only single characters.
_TINY_MERGES = ("t h", "th e</w>", "a t</w>", "o n</w>", "i n", "e r</w>", "c at</w>", "o g</w>", "d og</w>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    # bytes without a printable glyph are mapped past 255, in byte order, after the printable ones
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _cache_dir() -> Path:
    """Where generated tokenizer files live (``TRAINTRAIN_CACHE`` or ``~/.cache/traintrain``)."""
    base = Path(os.environ.get("TRAINTRAIN_CACHE") or Path.home() / ".cache" / "traintrain")
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / ".probe"
        probe.write_text("")
        probe.unlink()
        return base
    except OSError:  # read-only home: a private temp folder still works
        return Path(tempfile.mkdtemp(prefix="traintrain-"))


def _write_files(name: str, vocab: dict[str, int], merges: list[str]) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` once per content hash; return their paths."""
    text_vocab = json.dumps(vocab, ensure_ascii=False)
    text_merges = "#version: 0.2\n" + "\n".join(merges) + "\n"
    digest = hashlib.sha256((text_vocab + text_merges).encode("utf-8")).hexdigest()[:12]
    folder = _cache_dir() / "tokenizers" / f"{name}-{digest}"
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        atomic_write_text(vocab_path, text_vocab)
        atomic_write_text(merges_path, text_merges)
    return str(vocab_path), str(merges_path)


@functools.lru_cache(maxsize=1)
def _clip_files() -> tuple[str, str]:
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header; OpenAI keeps 48,894 merges
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return _write_files("clip", {t: i for i, t in enumerate(tokens)}, merges)


@functools.lru_cache(maxsize=1)
def _tiny_files() -> tuple[str, str]:
    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)]  # "!" first, so the OpenCLIP pad is id 0 here too
    merges = list(_TINY_MERGES)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return _write_files("tiny", {t: i for i, t in enumerate(tokens)}, merges)


def tiny_vocab_size() -> int:
    """Number of ids the tiny tokenizer emits (the tiny text encoders have at least this many)."""
    return 2 * 94 + len(_TINY_MERGES) + 2


def _build(files: tuple[str, str], pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(files[0], files[1], pad_token=pad_token, model_max_length=MAX_LENGTH)
    tokenizer.model_max_length = MAX_LENGTH  # files carry no limit; the class default is 1e30
    return tokenizer


@functools.lru_cache(maxsize=4)
def build_clip_tokenizer(pad_token: str = PAD_CLIP) -> Any:
    """The real OpenAI CLIP tokenizer, built offline.

    Args:
        pad_token: ``PAD_CLIP`` (``<|endoftext|>``, SD1 and SDXL TE1) or ``PAD_OPEN_CLIP`` (``!``, SD2 and SDXL TE2).

    Returns:
        A transformers ``CLIPTokenizer`` with ``model_max_length`` 77 (shared: do not mutate).
    """
    return _build(_clip_files(), pad_token)


@functools.lru_cache(maxsize=4)
def build_tiny_tokenizer(pad_token: str = PAD_CLIP) -> Any:
    """A character-level CLIP tokenizer (~200 ids) for the built-in tiny models.

    Args:
        pad_token: as for :func:`build_clip_tokenizer`.

    Returns:
        A transformers ``CLIPTokenizer`` with ``model_max_length`` 77 (shared: do not mutate).
    """
    return _build(_tiny_files(), pad_token)


def tokenizer_for(vocab_size: int, pad_token: str) -> Any:
    """Pick the tokenizer that fits a text encoder: the real CLIP one for 49,408 ids, else the tiny one.

    Raises:
        ValueError: the encoder's vocabulary is smaller than the tiny tokenizer's.
    """
    if vocab_size == CLIP_VOCAB_SIZE:
        return build_clip_tokenizer(pad_token)
    if vocab_size < tiny_vocab_size():
        raise ValueError(f"text encoder vocabulary {vocab_size} is smaller than the tiny tokenizer's {tiny_vocab_size()}")
    return build_tiny_tokenizer(pad_token)
