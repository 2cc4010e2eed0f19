"""Puts the fake Web-UI (``fake_webui/``: ``modules`` and the built-in Lora ``networks``) on sys.path for
these tests only, fresh for every test, and takes it away afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).parent / "fake_webui"
FAKE_NAMES = ("modules", "networks", "launch")


def _drop_fake_modules() -> None:
    for key in [k for k in sys.modules if k.split(".")[0] in FAKE_NAMES]:
        del sys.modules[key]


@pytest.fixture(autouse=True)
def fake_webui(monkeypatch, tmp_path):
    """A fresh fake Web-UI: ``modules.shared`` etc. importable, state reset, Lora dir in tmp_path."""
    _drop_fake_modules()
    monkeypatch.syspath_prepend(str(FAKE))
    from modules import paths, shared

    shared.reset()
    shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    paths.models_path = str(tmp_path / "models")
    yield shared
    _drop_fake_modules()


@pytest.fixture(scope="session")
def models():
    """Builders of the tiny fake Web-UI models (imported lazily: diffusers/transformers are slow)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import fake_models

    return fake_models
