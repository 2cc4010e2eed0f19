"""The command line: train with a preset and --set, the result JSON, check, and one-line errors."""

from __future__ import annotations

import json

from trainer.__main__ import main
from trainer.network import load_lora


def test_train_from_a_preset_writes_the_lora_and_the_result_json(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(data / f"i{i}.png")
    result_path = tmp_path / "result.json"
    code = main(["train", "presets/LoRA.json", "--model", "tiny-sd1", "--lora-dir", str(tmp_path / "out"),
                 "--logs-dir", str(tmp_path / "logs"), "--json-dir", str(tmp_path / "json"), "--quiet",
                 "--set", f"lora_data_directory={data}", "--set", "image_size(height, width)=64",
                 "--set", "image_buckets_step=32", "--set", "image_min_length=32", "--set", "train_iterations=3",
                 "--set", "train_batch_size=1", "--set", "save_lora_name=cli_lora", "--set", "train_seed=7",
                 "--set", "save_as_json=true", "--result-json", str(result_path)])
    assert code == 0
    result = json.loads(result_path.read_text())
    assert {"status", "lora_path", "steps", "final_loss", "seconds", "seed"} <= result.keys()
    assert result["status"] == "done" and result["steps"] == 3 and result["seed"] == 7
    assert load_lora(result["lora_path"])[1]["ss_seed"] == "7"
    assert list((tmp_path / "logs").rglob("cli_lora-*.csv")) and list((tmp_path / "json").rglob("cli_lora-*.json"))
    out = capsys.readouterr().out
    assert "LoRA saved to" in out and "Logs and previews: " in out

    check_json = tmp_path / "check.json"
    assert main(["check", result["lora_path"], "--model", "tiny-sd1", "--size", "64", "--json", str(check_json)]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]  # the verdict first, before the JSON report
    assert first_line.startswith("OK cli_lora.safetensors: sd1 lierla rank ") and "Effect = " in first_line
    report = json.loads(check_json.read_text())
    assert report["family"] == "sd1" and report["unmatched"] == [] and report["matched"] == report["modules_in_file"]
    assert report["effect"] > 0 and report["effect_negative"] > 0 and not report["warnings"]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = main(["train", "--mode", "LoRA", "--model", "tiny-sd1", "--lora-dir", str(tmp_path),
                 "--set", "network_rank=0", "--set", f"lora_data_directory={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "network_rank" in err
    assert main(["train", "--set", "no_such_setting=1"]) == 2
    assert "no_such_setting" in capsys.readouterr().err


def test_check_flags_a_lora_that_changes_nothing(tmp_path, capsys):
    import torch

    from trainer.models.diffusers_runtime import load_bundle
    from trainer.network import NetworkSpec, build_network, save_lora

    bundle = load_bundle("tiny-sd1", device="cpu")
    network = build_network(bundle, NetworkSpec("lierla", 4, 4))  # up weights start at zero: no effect
    path = save_lora(tmp_path / "zero.safetensors", network.kohya_state_dict(dtype=torch.float32), {"ss_network_dim": "4"})
    assert main(["check", str(path), "--model", "tiny-sd1", "--size", "64"]) == 1
    assert "changes nothing" in capsys.readouterr().out


def test_cli_writes_logs_beside_the_lora_and_says_where(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(data / f"i{i}.png")
    out = tmp_path / "out"
    code = main(["train", "presets/LoRA.json", "--model", "tiny-sd1", "--lora-dir", str(out), "--quiet",
                 "--set", f"lora_data_directory={data}", "--set", "image_size(height, width)=64",
                 "--set", "image_buckets_step=32", "--set", "image_min_length=32", "--set", "train_iterations=2",
                 "--set", "train_batch_size=1", "--set", "save_lora_name=here", "--set", "effect_check=false"])
    assert code == 0
    logs = list((out / "logs").rglob("here-*.csv"))
    assert len(logs) == 1  # not in the install folder's logs/
    printed = capsys.readouterr().out
    assert f"Logs and previews: {logs[0].parent}" in printed
