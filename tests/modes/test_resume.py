"""Full resume: 20 steps straight equal 10 steps + stop-and-save + resume 10 steps, in every mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.errors import SettingsError
from trainer.hosts.standalone import StandaloneHost
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
    return run_job(settings, StandaloneHost(lora_dir=tmp_path / "lora", device="cpu"), events=Events(), stop=stop,
                   logs_root=tmp_path / "logs")


@pytest.mark.parametrize("mode,stop_after", [("LoRA", 10), ("iLECO", 10), ("ADDifT", 10), ("Multi-ADDifT", 10),
                                             ("Difference", 10), ("Difference", 30)])  # 30: in pass 2 of 20 + 20
def test_resume_continues_to_the_same_result(mode, stop_after, tmp_path, image_folder, image_pair):
    inputs = {"mode": mode, **_inputs(mode, tmp_path, image_folder, image_pair)}
    straight = _run(tmp_path, {**inputs, "save_lora_name": "straight"})
    stopped = _run(tmp_path, {**inputs, "save_lora_name": "resumed"}, stop_after=stop_after)
    assert stopped["status"] == "saved_stop" and stopped["steps"] == 10
    state = Path(stopped["resume_state"])
    assert state.is_file() and state.parent.name == "resume" and (tmp_path / "logs") in state.parents
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
                        "network_rank": 8, "train_resume_state": stopped["resume_state"]})
    assert torch.load(stopped["resume_state"], weights_only=True)["step"] == 2


def test_resume_states_stay_out_of_the_lora_folder(tmp_path, image_folder):
    """Web-UIs list every *.pt in models/Lora as a LoRA (and refuse ours as "may be malicious")."""
    inputs = {"mode": "LoRA", "lora_data_directory": str(image_folder), "save_per_steps": 5}
    kept = _run(tmp_path, {**inputs, "save_lora_name": "kept"}, stop_after=12)
    states = sorted((tmp_path / "logs").rglob("*.state.pt"))
    assert sorted(p.name for p in states) == ["kept_10steps.state.pt", "kept_12steps.state.pt", "kept_5steps.state.pt"]
    assert Path(kept["resume_state"]).name == "kept_12steps.state.pt" and Path(kept["resume_state"]) in states
    assert not [p for p in (tmp_path / "lora").rglob("*") if p.suffix != ".safetensors" and p.suffix != ".json"]
    off = _run(tmp_path, {**inputs, "save_lora_name": "off", "save_resume_state": False}, stop_after=6)
    assert off["resume_state"] is None and not list((tmp_path / "logs").rglob("off_*.state.pt"))
