"""trainer/paths.py: exclusive atomic writes and folder names for metadata."""

from __future__ import annotations

import os

import pytest

from trainer.paths import atomic_write_bytes, folder_name


def test_exclusive_write_never_replaces_a_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.safetensors"
    atomic_write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    atomic_write_bytes(target, b"third")  # save_overwrite on: replaced
    assert target.read_bytes() == b"third"


def test_exclusive_write_without_hard_links_still_refuses(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "b.bin"
    atomic_write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and sorted(os.listdir(tmp_path)) == ["b.bin"]


def test_folder_name_keeps_only_the_last_part(tmp_path):
    assert folder_name(str(tmp_path / "me" / "dataset")) == "dataset"
    assert folder_name(str(tmp_path / "me" / "dataset") + "/") == "dataset"
    assert folder_name("") == ""
