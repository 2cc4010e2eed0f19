"""Full resume: 20 steps straight equal 10 steps + stop-and-save + resume 10 steps, in every mode."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import SettingsError
from trainer.hosts.standalone import StandaloneHost
from trainer.modes.resume import state_path
from trainer.network import load_lora
from trainer.progress import Events
from trainer.runner import run_job
from trainer.settings import Settings

from .conftest import BASE, draw_image


def _inputs(mode, tmp_path, image_folder, image_pair):
    if mode == "LoRA":
        return {"lora_data_directory": str(image_folder)}
    if mode == "iLECO":
        return {"original prompt": "a cat", "target prompt": "a dog"}
    if mode in ("ADDifT", "Difference"):
        return {"original image": str(image_pair[0]), "target image": str(image_pair[1])}
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(2):
        draw_image(folder / f"q{i}.png", (200, 30 * i, 40))
        draw_image(folder / f"q{i}_b.png", (30 * i, 40, 200))
    return {"lora_data_directory": str(folder), "diff_target_name": "_b"}


def _run(tmp_path, values, stop_after=None):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return "save" if stop_after is not None and calls["n"] >= stop_after else None

    settings = Settings.from_layers(BASE, {"model": "tiny-sd1", "train_iterations": 20, "train_learning_rate": "3e-3",
                                           "train_lr_scheduler": "cosine", "train_batch_size": 1}, values)
    return run_job(settings, StandaloneHost(lora_dir=tmp_path / "lora", device="cpu"), events=Events(), stop=stop)


@pytest.mark.parametrize("mode,stop_after", [("LoRA", 10), ("iLECO", 10), ("ADDifT", 10), ("Multi-ADDifT", 10),
                                             ("Difference", 10), ("Difference", 30)])  # 30: in pass 2 of 20 + 20
def test_resume_continues_to_the_same_result(mode, stop_after, tmp_path, image_folder, image_pair):
    inputs = {"mode": mode, **_inputs(mode, tmp_path, image_folder, image_pair)}
    straight = _run(tmp_path, {**inputs, "save_lora_name": "straight"})
    stopped = _run(tmp_path, {**inputs, "save_lora_name": "resumed"}, stop_after=stop_after)
    assert stopped["status"] == "saved_stop" and stopped["steps"] == 10
    state = state_path(stopped["lora_path"])
    assert state.is_file()
    resumed = _run(tmp_path, {**inputs, "save_lora_name": "resumed", "train_resume_state": str(state)})
    assert resumed["status"] == "done" and resumed["steps"] == 20
    a, b = load_lora(straight["lora_path"])[0], load_lora(resumed["lora_path"])[0]
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


def test_resume_refuses_a_state_of_other_settings(tmp_path, image_folder, image_pair):
    stopped = _run(tmp_path, {"mode": "LoRA", "lora_data_directory": str(image_folder), "save_lora_name": "r"}, stop_after=2)
    with pytest.raises(SettingsError, match="train_resume_state.*network_rank"):
        _run(tmp_path, {"mode": "LoRA", "lora_data_directory": str(image_folder), "save_lora_name": "r2",
                        "network_rank": 8, "train_resume_state": str(state_path(stopped["lora_path"]))})
    assert torch.load(state_path(stopped["lora_path"]), weights_only=True)["step"] == 2
