"""Loading the flow DiT families offline, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.errors import InputError
from trainer.models.diffusers_runtime import load_bundle
from trainer.models.dit_loading import TURBO_NOTE, save_dit_folder
from trainer.models.tiny_dit import build_tiny_dit

# Z-Image/Anima need diffusers >= 0.42 (0.37's Z-Image transformer gives NaN; trainer/models/dit.py refuses it)
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in __import__("diffusers").__version__.split(".")[:2]) < (0, 42),
    reason="Z-Image/Anima need diffusers >= 0.42")



@pytest.fixture(scope="module")
def zimage_folder(tmp_path_factory):
    return save_dit_folder(build_tiny_dit("tiny-zimage"), tmp_path_factory.mktemp("m") / "Z-Image-Turbo-tiny")


def test_a_zimage_diffusers_folder_loads_offline_as_the_builtin(zimage_folder):
    loaded = load_bundle(str(zimage_folder), device="cpu")
    builtin = load_bundle("tiny-zimage", device="cpu")
    assert loaded.family.value == "zimage" and loaded.flow.shift == 3.0
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])
    out = loaded.predict(x, sigma, loaded.encode_prompts(["a red cat"]))
    ref = builtin.predict(x, sigma, builtin.encode_prompts(["a red cat"]))
    assert torch.allclose(out, ref, atol=1e-5)
    assert TURBO_NOTE in loaded.notes  # a Turbo checkpoint warns how to train it


def test_zimage_folder_without_text_encoder_is_refused_before_loading(zimage_folder, tmp_path):
    import shutil

    broken = tmp_path / "zi"
    shutil.copytree(zimage_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(InputError, match="without text_encoder/ \\(its Qwen3 text encoder\\)"):
        load_bundle(str(broken), device="cpu")


def test_a_mismatched_vae_is_refused(zimage_folder, tmp_path):
    vae = tmp_path / "sdvae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}), encoding="utf-8")
    with pytest.raises(InputError, match="has 4 latent channels but Z-Image needs 16"):
        load_bundle(str(zimage_folder), str(vae), device="cpu")


@pytest.mark.parametrize(("cls", "what"), [("FluxPipeline", "Flux"), ("QwenImagePipeline", "Qwen-Image"),
                                           ("ChromaPipeline", "Chroma")])
def test_next_release_families_are_named(tmp_path, cls, what):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}), encoding="utf-8")
    with pytest.raises(InputError, match=f"a {what} model .*next release"):
        load_bundle(str(tmp_path), device="cpu")


def test_single_dit_files_are_named_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    zimage = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file({"model.diffusion_model.context_refiner.0.attention.k_norm.weight": torch.ones(2)}, str(zimage))
    with pytest.raises(InputError, match="Z-Image transformer without its Qwen3 text encoder"):
        load_bundle(str(zimage), device="cpu")
    anima = tmp_path / "anima.safetensors"
    save_file({"net.llm_adapter.embed.weight": torch.ones(2, 2)}, str(anima))
    with pytest.raises(InputError, match="Anima checkpoint"):
        load_bundle(str(anima), device="cpu")


def test_an_old_diffusers_is_refused_with_one_line():
    from trainer.errors import TrainTrainError
    from trainer.models.dit import check_diffusers_version

    check_diffusers_version("0.42.1")
    check_diffusers_version("1.0.0.dev0")
    with pytest.raises(TrainTrainError, match=r"needs diffusers >= 0\.42 \(this environment has 0\.37\.1"):
        check_diffusers_version("0.37.1")
