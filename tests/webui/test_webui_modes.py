"""Every mode through the real runner and the Web-UI host: files land in the Web-UI's Lora folder with
the right key layout, the Lora list is refreshed, the model comes back bit-exact (also after an error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fingerprint, mode_inputs
from PIL import Image

from trainer.hosts.webui import WebUIHost
from trainer.network import load_lora
from trainer.progress import Events
from trainer.runner import run_job
from trainer.settings import Settings

BASE = {"image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32, "train_iterations": 3,
        "train_batch_size": 1, "train_seed": 0, "train_model_precision": "fp32", "save_precision": "fp32",
        "network_rank": 4, "network_alpha": 4, "logging_save_csv": False, "effect_check": True}


_inputs = mode_inputs


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
def test_every_mode_trains_in_place_and_restores(webui, mode, tmp_path):
    import networks

    before = fingerprint(webui.sd_model)
    refreshes = len(networks.refreshes)
    settings = Settings.from_layers(BASE, {"mode": mode, "save_lora_name": f"w_{mode}"}, _inputs(mode, tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    assert result["status"] == "done" and result["steps"] == 3
    path = result["lora_path"]
    assert path.startswith(webui.cmd_opts.lora_dir)
    state, meta = load_lora(path)
    assert meta["traintrain_mode"] == mode and meta["ss_base_model_version"] == "sd_v1"
    assert any(k.startswith("lora_unet_down_blocks_") for k in state)  # SD1 U-Net in diffusers layout
    assert fingerprint(webui.sd_model) == before
    assert len(networks.refreshes) > refreshes  # the Lora list was rescanned: the LoRA shows without a restart


def test_sdxl_lora_uses_sgm_names_and_pixel_sizes(webui, tmp_path):
    from modules import sd_models

    sd_models.reload_model_weights(info=sd_models.checkpoints_list["xl.safetensors [def]"])
    before = fingerprint(webui.sd_model)
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "xl"}, _inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    state, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    assert not any(k.startswith("lora_unet_down_blocks_") for k in state)
    assert fingerprint(webui.sd_model) == before


def test_an_error_inside_the_run_leaves_the_model_restored(webui, tmp_path, monkeypatch):
    import trainer.modes.lora as lora

    before = fingerprint(webui.sd_model)

    def explode(*args, **kwargs):
        raise RuntimeError("injected failure after the adapters were attached")

    monkeypatch.setattr(lora, "run_pass", explode)
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "boom"}, _inputs("LoRA", tmp_path))
    with pytest.raises(RuntimeError, match="injected"):
        run_job(settings, WebUIHost(), events=Events())
    assert fingerprint(webui.sd_model) == before
    with torch.no_grad():
        assert not any("forward" in m.__dict__ for m in webui.sd_model.modules())


@pytest.mark.parametrize("mode", ["LoRA", "Multi-ADDifT"])
def test_practitioners_controls_train_in_place_and_restore(webui, mode, tmp_path):
    """Reg images, kohya repeats, epochs, caption controls, masked loss and noise controls in the Web-UI."""
    data = tmp_path / "data" / "2_thing"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGBA", (64, 64), (200, 50 * i, 40, 255 if i else 0)).save(data / f"a{i}.png")
        Image.new("RGB", (64, 64), (40, 50 * i, 200)).save(data / f"a{i}_t.png")
        (data / f"a{i}.txt").write_text("thing, red, square, big", encoding="utf-8")
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(reg / "r.png")
    before = fingerprint(webui.sd_model)
    values = {"mode": mode, "save_lora_name": f"practice_{mode}", "lora_data_directory": str(tmp_path / "data"),
              "diff_target_name": "_t", "train_epochs": 2, "shuffle_caption": True, "keep_tokens": 1,
              "caption_dropout_rate": 0.2, "noise_offset": 0.05, "multires_noise_iterations": 2}
    if mode == "LoRA":
        values.update(reg_data_directory=str(reg), masked_loss=True)
    result = run_job(Settings.from_layers(BASE, values), WebUIHost(), events=Events())
    # LoRA: (2 images + 2 targets named like images) x 2 repeats + as many reg samples = 16 per epoch
    assert result["status"] == "done" and result["steps"] == (32 if mode == "LoRA" else 4)
    _, meta = load_lora(result["lora_path"])
    assert meta["ss_num_epochs"] == "2" and meta["ss_noise_offset"] == "0.05"
    assert fingerprint(webui.sd_model) == before


def test_the_webuis_clip_skip_is_recorded(webui, tmp_path, monkeypatch):
    """The Web-UI encodes prompts with its own Clip skip option; the LoRA records that value (kohya's
    ss_clip_skip), and our clip_skip setting, which does not apply here, says so."""
    from modules import shared

    monkeypatch.setattr(shared.opts, "CLIP_stop_at_last_layers", 2)
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "skip", "clip_skip": 3},
                                    _inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    meta = load_lora(result["lora_path"])[1]
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_mixed_precision"] == "no" and meta["ss_zero_terminal_snr"] == "False"
    assert any("clip_skip 3 is not used here" in n for n in result["notes"])


def test_stop_and_save_gets_the_card_sidecar_too(webui, tmp_path):
    """The stop-and-save file is the LoRA the user has: A1111's <name>.json card comes with it (measured in
    Forge and Neo: only the final save had one)."""
    calls = []

    def stop():
        calls.append(1)
        return "save" if len(calls) >= 2 else None

    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "halt", "train_iterations": 50},
                                    _inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events(), stop=stop)
    assert result["status"] == "saved_stop"
    card = Path(result["lora_path"]).with_suffix(".json")
    assert card.is_file() and json.loads(card.read_text(encoding="utf-8"))["sd_version"] == "SD1"
