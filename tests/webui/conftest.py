"""Puts the fake Web-UI (``fake_webui/``: ``modules`` and the built-in Lora ``networks``) on sys.path for
these tests only, fresh for every test, and takes it away afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).parent / "fake_webui"
FAKE_FORGE = Path(__file__).parent / "fake_forge"  # Forge / Forge Neo: only what differs from A1111
FAKE_NAMES = ("modules", "networks", "launch", "modules_forge", "backend")


def _drop_fake_modules() -> None:
    for key in [k for k in sys.modules if k.split(".")[0] in FAKE_NAMES]:
        del sys.modules[key]


def _fresh_webui(root: Path, monkeypatch, tmp_path):
    """Import the fake ``modules`` from ``root`` (fresh), reset its state, put its folders in tmp_path."""
    _drop_fake_modules()
    monkeypatch.syspath_prepend(str(root))
    from modules import paths, shared

    shared.reset()
    shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    paths.models_path = str(tmp_path / "models")
    paths.data_path = str(tmp_path)
    return shared


@pytest.fixture(autouse=True)
def fake_webui(monkeypatch, tmp_path):
    """A fresh fake Web-UI: ``modules.shared`` etc. importable, state reset, Lora dir in tmp_path."""
    yield _fresh_webui(FAKE, monkeypatch, tmp_path)
    _drop_fake_modules()


@pytest.fixture(scope="session")
def models():
    """Builders of the tiny fake Web-UI models (imported lazily: diffusers/transformers are slow)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import fake_models

    return fake_models


@pytest.fixture
def webui(fake_webui, models):
    """A1111 with an SD1 model loaded (U-Net requires_grad=True as A1111 leaves it) and a second checkpoint."""
    from modules import sd_models, sd_vae

    sd_models.checkpoints_list.clear()
    sd_models.loads.clear()
    sd_vae.vae_dict.clear()
    sd_vae.reloads.clear()
    sd_vae.loaded_vae_file = None
    built = {}

    def factory(title, cls, seed):
        def make():
            if title not in built:
                built[title] = cls(seed=seed)
            return built[title]
        return make

    for title, cls, seed in (("base.safetensors [abc]", models.LatentDiffusion, 1), ("xl.safetensors [def]", models.DiffusionEngine, 2)):
        sd_models.checkpoints_list[title] = sd_models.CheckpointInfo(title, f"/m/{title.split()[0]}", title.split(".")[0], factory(title, cls, seed))
    sd_vae.vae_dict["better.vae.pt"] = "/vae/better.vae.pt"
    sd_models.reload_model_weights(info=sd_models.checkpoints_list["base.safetensors [abc]"])
    sd_models.loads.clear()
    fake_webui.sd_model.cond_stage_model.wrapped.transformer.requires_grad_(False)
    fake_webui.sd_model.first_stage_model.requires_grad_(False)
    return fake_webui


@pytest.fixture
def forge(fake_webui, models, monkeypatch, tmp_path):
    """Forge Neo as a real build starts: checkpoints ``base`` (SD1) and ``xl`` (SDXL) listed, ``base``
    selected in the dropdown, nothing loaded (``shared.sd_model`` is None until a generation, or a job,
    calls ``forge_model_reload``, which builds the engine under inference mode)."""
    shared = _fresh_webui(FAKE_FORGE, monkeypatch, tmp_path)
    import fake_forge_models
    from modules import sd_models

    for title, make in (("base.safetensors [abc]", fake_forge_models.forge_sd1),
                        ("xl.safetensors [def]", fake_forge_models.forge_sdxl)):
        sd_models.checkpoints_list[title] = sd_models.CheckpointInfo(title, f"/m/{title.split()[0]}", title.split(".")[0], make)
    sd_models.select("base.safetensors [abc]")
    return shared
