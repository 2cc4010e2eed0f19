"""File writing: atomic, finite-checked, kohya hashes; metadata keys; A1111 sidecar."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save as st_save

from trainer.errors import TrainTrainError
from trainer.models.bundle import Family
from trainer.network import build_metadata, load_lora, read_metadata, save_lora, write_sidecar
from trainer.network.kohya_io import legacy_hash, precalculate_hashes


def _tensors(big: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    n = 300_000 if big else 8  # > 1 MiB so the legacy hash reads real data
    return {"lora_unet_a.lora_down.weight": torch.randn(4, n), "lora_unet_a.alpha": torch.tensor(2.0)}


def _metadata(**overrides) -> dict[str, str]:
    fields = dict(
        family=Family.SD1, v_pred=False, network_type="c3lier", rank=16, alpha=8, conv_rank=4, conv_alpha=0,
        output_name="my_lora", model_name="sd15", image_size_hw=(512, 768), training_started_at=1_700_000_000.0,
        training_finished_at=1_700_000_100.0, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5,
        optimizer="adamw", lr_scheduler="cosine", max_train_steps=500, steps=500, seed=7, min_snr_gamma=5.0,
        mixed_precision="fp16", num_train_images=12, batch_size=2, tag_frequency={"1_cat": {"cat": 3, "sofa": 1}},
        session_id=42, extra={"mode": "LoRA", "prompts": ["a", "b"]},
    )
    fields.update(overrides)
    return build_metadata(**fields)


@pytest.mark.parametrize("big", [False, True])
def test_hashes_match_written_file(tmp_path, big):
    tensors = _tensors(big)
    meta = _metadata()
    path = save_lora(tmp_path / "x.safetensors", tensors, meta)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    written = read_metadata(path)
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest()
    # kohya hashes a buffer holding only the ss_* metadata (user edits of other keys never change it)
    ss_only = st_save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert written["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert written["sshs_legacy_hash"] == legacy_hash(ss_only)
    assert precalculate_hashes(tensors, {**meta, "modelspec.title": "edited"}) == (
        written["sshs_model_hash"], written["sshs_legacy_hash"]
    )
    state, loaded_meta = load_lora(path)
    assert torch.equal(state["lora_unet_a.lora_down.weight"], tensors["lora_unet_a.lora_down.weight"])
    assert loaded_meta == written


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_writes_nothing(tmp_path, bad):
    tensors = _tensors()
    tensors["lora_unet_b.lora_up.weight"] = torch.tensor([[1.0, bad]])
    target = tmp_path / "x.safetensors"
    with pytest.raises(TrainTrainError, match="lora_unet_b.lora_up.weight"):
        save_lora(target, tensors, {})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    target = save_lora(tmp_path / "x.safetensors", _tensors(), {"ss_v2": "False"})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        save_lora(target, _tensors(), {"ss_steps": 5})  # non-string metadata
    assert target.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


REQUIRED = (
    "ss_base_model_version ss_v2 ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_output_name "
    "ss_training_started_at ss_training_finished_at ss_sd_model_name ss_resolution ss_tag_frequency ss_learning_rate "
    "ss_unet_lr ss_text_encoder_lr ss_optimizer ss_lr_scheduler ss_max_train_steps ss_steps ss_seed ss_min_snr_gamma "
    "ss_mixed_precision ss_num_train_images ss_batch_size_per_device ss_session_id modelspec.sai_model_spec "
    "modelspec.architecture modelspec.implementation modelspec.title modelspec.resolution modelspec.date "
    "modelspec.prediction_type modelspec.timestep_range"
).split()


def test_metadata_has_required_keys_and_kohya_values():
    meta = _metadata()
    assert set(REQUIRED) <= set(meta) and all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8.0"}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    assert meta["ss_resolution"] == "(768, 512)" and meta["modelspec.resolution"] == "768x512"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_cat": {"cat": 3, "sofa": 1}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_session_id"] == "42" and meta["traintrain_mode"] == "LoRA"
    assert json.loads(meta["traintrain_prompts"]) == ["a", "b"]


@pytest.mark.parametrize(("family", "v_pred", "version", "arch", "v2"), [
    (Family.SD2, True, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "True"),
    (Family.SD2, False, "sd_v2", "stable-diffusion-v2-512/lora", "True"),
    (Family.SDXL, False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
])
def test_metadata_per_family(family, v_pred, version, arch, v2):
    meta = _metadata(family=family, v_pred=v_pred)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_v2"]) == (version, arch, v2)
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")


def test_loha_metadata_is_lycoris():
    meta = _metadata(network_type="loha", conv_rank=0)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "16", "conv_alpha": "8.0"}


def test_metadata_from_run_objects(sd1_bundle):
    from trainer.network import NetworkSpec, build_network

    class S:
        train_learning_rate, train_textencoder_learning_rate, train_optimizer = 1e-4, 0, "AdamW"
        train_lr_scheduler, train_iterations, train_batch_size, train_snr_gamma = "cosine", 100, 2, 5
        train_lora_precision, train_min_timesteps, train_max_timesteps = "fp32", 0, 1000

    net = build_network(sd1_bundle, NetworkSpec("lierla", 4, 2, blocks=("M00",)))
    meta = build_metadata(settings=S(), network=net, bundle=sd1_bundle, output_name="x_copy", steps=50, seed=3,
                          started_at=1.0, resolution=(640, 512), extra={"traintrain_mode": "Difference"})
    assert meta["ss_resolution"] == "(640, 512)" and meta["ss_optimizer"] == "adamw"
    assert meta["ss_text_encoder_lr"] == "0.0001" and meta["traintrain_mode"] == "Difference"
    assert meta["ss_network_dim"] == "4" and meta["ss_sd_model_name"] == "tiny"


def test_sidecar_card_keeps_user_fields(tmp_path):
    lora = tmp_path / "slider.safetensors"
    card = write_sidecar(lora, activation_text="smile", preferred_weight=-1, sd_version=Family.SDXL, notes="iLECO")
    data = json.loads(card.read_text())
    assert card.name == "slider.json"
    assert data == {"description": "", "negative text": "", "sd version": "SDXL", "activation text": "smile",
                    "preferred weight": -1.0, "notes": "iLECO"}
    card.write_text(json.dumps({**data, "description": "mine"}))
    write_sidecar(lora, activation_text="grin", sd_version="sd1")
    data = json.loads(card.read_text())
    assert data["description"] == "mine" and data["activation text"] == "grin" and data["sd version"] == "SD1"
