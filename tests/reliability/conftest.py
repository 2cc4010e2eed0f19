"""Fixtures for the reliability tests: one tiny dataset and one cached tiny-sd1 host per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.demo import make_sample_dataset
from trainer.hosts.standalone import StandaloneHost


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Three small captioned images (two aspect ratios), shared by every test that trains on a folder."""
    return make_sample_dataset(tmp_path_factory.mktemp("rel_data") / "data", count=3, size=64)


@pytest.fixture(scope="session")
def shared_host(tmp_path_factory) -> StandaloneHost:
    """One CPU host for the whole session, so tiny-sd1 is built once and reused by every job."""
    return StandaloneHost(lora_dir=tmp_path_factory.mktemp("rel_lora"), device="cpu")


@pytest.fixture
def host(shared_host, tmp_path) -> StandaloneHost:
    """The shared host writing into this test's own LoRA folder (the model cache is kept)."""
    shared_host._lora_dir = tmp_path / "lora"
    return shared_host
