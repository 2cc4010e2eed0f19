"""The offline CLIP tokenizers: real OpenAI ids, pad conventions, the tiny character tokenizer."""

from __future__ import annotations

from trainer.models.tokenizer import (
    CLIP_VOCAB_SIZE,
    PAD_CLIP,
    PAD_OPEN_CLIP,
    build_clip_tokenizer,
    build_tiny_tokenizer,
    tiny_vocab_size,
)


def test_real_clip_ids_match_openai() -> None:
    tok = build_clip_tokenizer(PAD_CLIP)
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == CLIP_VOCAB_SIZE
    assert tok.model_max_length == 77


def test_pad_tokens_per_family() -> None:
    sd1 = build_clip_tokenizer(PAD_CLIP)("a cat", padding="max_length", max_length=77)["input_ids"]
    sd2 = build_clip_tokenizer(PAD_OPEN_CLIP)("a cat", padding="max_length", max_length=77)["input_ids"]
    assert sd1[:4] == sd2[:4] == [49406, 320, 2368, 49407]
    assert set(sd1[4:]) == {49407}
    assert set(sd2[4:]) == {0}


def test_tiny_tokenizer_is_small_and_padded() -> None:
    tok = build_tiny_tokenizer(PAD_OPEN_CLIP)
    ids = tok("the cat", padding="max_length", max_length=10)["input_ids"]
    assert len(tok) == tiny_vocab_size() < 1000
    assert ids[0] == tiny_vocab_size() - 2 and ids[3] == tiny_vocab_size() - 1  # BOS the cat EOS
    assert ids[4:] == [0] * 6
