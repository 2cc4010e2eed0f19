"""Captions (§10.3): precedence, trigger joining, UTF-8/BOM, filename tags, tag counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.data.captions import compose_caption, filename_tags, tag_frequency
from trainer.errors import InputError


def test_filename_tags_cut_at_id_and_underscores_to_commas():
    assert filename_tags("1girl_red_hair_id_3_x") == "1girl,red,hair"
    assert filename_tags("plain") == "plain"


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "cat_sitting.png"
    p.write_bytes(b"")
    return p


def test_precedence_filename_then_txt_then_caption(img):
    img.with_suffix(".caption").write_text("from caption")
    assert compose_caption(img, "trg", False) == "trg, from caption"
    img.with_suffix(".txt").write_bytes("\ufeff  from txt \n".encode())
    assert compose_caption(img, "trg", False) == "trg, from txt"
    assert compose_caption(img, "trg", True) == "trg,cat,sitting"


def test_empty_trigger_has_no_leading_separator(img):
    assert compose_caption(img, "", True) == "cat,sitting"
    img.with_suffix(".txt").write_text("a dog")
    assert compose_caption(img, "  ", False) == "a dog"
    img.with_suffix(".txt").unlink()
    assert compose_caption(img, "trg", False) == "trg"


def test_non_utf8_caption_raises(img):
    img.with_suffix(".txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(InputError, match="UTF-8"):
        compose_caption(img, "", False)


def test_tag_frequency():
    assert tag_frequency(["a, b", "b,c ,", " a"]) == {"a": 2, "b": 2, "c": 1}


@given(st.text(max_size=60), st.text(max_size=20), st.booleans())
def test_caption_parsing_on_arbitrary_names_never_raises(tmp_path_factory, stem, trigger, as_tag):
    tags = filename_tags(stem)
    assert "_" not in tags and tags == stem.split("_id_", 1)[0].replace("_", ",")
    folder = tmp_path_factory.getbasetemp()
    caption = compose_caption(folder / f"{stem}.png", trigger, as_tag)
    assert isinstance(caption, str)
    tag_frequency([tags, trigger, caption])
