"""Saving (modes/setup.py): a finished LoRA is never replaced without save_overwrite; no local path is leaked."""

from __future__ import annotations

from trainer.hosts.standalone import StandaloneHost
from trainer.network import load_lora
from trainer.progress import Events, HistorySink
from trainer.runner import run_job
from trainer.settings import Settings

from .conftest import BASE


def test_a_lora_written_by_another_run_meanwhile_is_kept(tmp_path, image_folder):
    # the overwrite check ran only at start: a second run of the same name silently replaced the first
    lora_dir = tmp_path / "lora"
    host = StandaloneHost(lora_dir=lora_dir, device="cpu")
    settings = Settings.from_layers(BASE, {"model": "tiny-sd1", "lora_data_directory": str(image_folder),
                                           "train_iterations": 3, "save_lora_name": "same", "save_overwrite": False})
    first = lora_dir / "same.safetensors"
    calls = []

    def stop():  # called every step: the other run finishes while this one trains
        calls.append(1)
        if len(calls) == 2:
            first.write_bytes(b"the other run's LoRA")
        return None

    result = run_job(settings, host, events=Events([HistorySink()]), stop=stop)
    assert first.read_bytes() == b"the other run's LoRA"  # untouched
    assert result["status"] == "done" and result["lora_path"] == str(lora_dir / "same_1.safetensors")
    assert load_lora(result["lora_path"])[1]["ss_output_name"] == "same_1"
    assert any("same.safetensors was created by something else" in n and "save_overwrite" in n for n in result["notes"])
    assert not list(lora_dir.glob(".*.tmp"))


def test_metadata_names_the_dataset_folders_without_their_path(trainer, image_folder, tmp_path):
    reg = tmp_path / "private" / "reg_class"
    reg.mkdir(parents=True)
    from .conftest import draw_image

    draw_image(reg / "r0.png", (90, 90, 90))
    result = trainer.run(model="tiny-sd1", lora_data_directory=str(image_folder), reg_data_directory=str(reg),
                         train_iterations=1, save_lora_name="private")
    meta = load_lora(result["lora_path"])[1]
    assert meta["traintrain_data"] == image_folder.name and meta["traintrain_reg_data"] == "reg_class"
    leaked = [k for k, v in meta.items() if str(tmp_path) in v]
    assert leaked == []  # no value holds the user's folders
