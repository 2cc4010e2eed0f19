"""The command line: train with a preset and --set, the result JSON, check, and one-line errors."""

from __future__ import annotations

import json

from trainer.__main__ import main
from trainer.network import load_lora


def _tiny_lora_sets(data, steps: int, name: str) -> list[str]:
    """``--set`` flags for a tiny 64 px LoRA run on ``data`` (batch 1)."""
    values = {"lora_data_directory": data, "image_size(height, width)": 64, "image_buckets_step": 32,
              "image_min_length": 32, "train_iterations": steps, "train_batch_size": 1, "save_lora_name": name}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def test_train_from_a_preset_writes_the_lora_and_the_result_json(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(data / f"i{i}.png")
    result_path = tmp_path / "result.json"
    code = main(["train", "presets/LoRA.json", "--model", "tiny-sd1", "--lora-dir", str(tmp_path / "out"),
                 "--logs-dir", str(tmp_path / "logs"), "--json-dir", str(tmp_path / "json"), "--quiet",
                 *_tiny_lora_sets(data, 3, "cli_lora"), "--set", "train_seed=7",
                 "--set", "save_as_json=true", "--result-json", str(result_path)])
    assert code == 0
    result = json.loads(result_path.read_text())
    out = capsys.readouterr().out
    assert "report: " in out and "Logs and previews: " in out  # the card's three lines follow the message
    assert {"status", "lora_path", "steps", "final_loss", "seconds", "seed"} <= result.keys()
    assert result["status"] == "done" and result["steps"] == 3 and result["seed"] == 7
    assert load_lora(result["lora_path"])[1]["ss_seed"] == "7"
    assert list((tmp_path / "logs").rglob("cli_lora-*.csv")) and list((tmp_path / "json").rglob("cli_lora-*.json"))
    check_json = tmp_path / "check.json"
    # three steps at 1e-4 learn nothing measurable: check says so (exit 1), as training did
    assert "did not learn" in result["message"]
    meta = load_lora(result["lora_path"])[1]
    assert str(tmp_path) not in meta["traintrain_report_probe"]  # image names only: a shared file leaks no folders
    assert main(["check", result["lora_path"], "--model", "tiny-sd1", "--size", "64", "--images", str(data.parent),
                 "--json", str(check_json)]) == 1
    first_line = capsys.readouterr().out.splitlines()[0]  # the verdict first, before the JSON report
    assert first_line.startswith("PROBLEM cli_lora.safetensors: sd1 lierla rank ") and "did not learn" in first_line
    report = json.loads(check_json.read_text())
    assert report["family"] == "sd1" and report["unmatched"] == [] and report["matched"] == report["modules_in_file"]
    card = report["report"]
    assert card["kind"] == "images" and card["change"] > 0 and card["efficacy"] is not None and not card["failed"]
    assert card == {**result["report"], "seconds": card["seconds"]}  # training and check: the same card
    assert report["warnings"] == [card["verdict"]] and not card["learned"]
    for image in data.glob("*.png"):  # the training images moved away: check still answers, without them
        image.unlink()
    main(["check", result["lora_path"], "--model", "tiny-sd1", "--size", "64", "--json", str(check_json)])
    report = json.loads(check_json.read_text())
    assert report["report"]["efficacy"] is None and "measured without the images" in report["warnings"][0]


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


def test_ctrl_c_saves_then_exits_130(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from PIL import Image

    import trainer.__main__ as cli

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(data / "i0.png")
    real_call, calls = cli._StopOnSignal.__call__, []

    def press_ctrl_c_once(self):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # through the real handler: stop and save after this step
        return real_call(self)

    monkeypatch.setattr(cli._StopOnSignal, "__call__", press_ctrl_c_once)
    result_path = tmp_path / "result.json"
    code = main(["train", "--mode", "LoRA", "--model", "tiny-sd1", "--lora-dir", str(tmp_path / "out"),
                 "--logs-dir", str(tmp_path / "logs"), "--quiet", "--result-json", str(result_path),
                 *_tiny_lora_sets(data, 50, "stopped")])
    result = json.loads(result_path.read_text())
    assert code == 130 and result["status"] == "saved_stop" and result["steps"] < 50
    assert load_lora(result["lora_path"])[1]["ss_steps"] == str(result["steps"])  # saved before exiting
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back


def test_cli_writes_logs_beside_the_lora_and_says_where(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(data / f"i{i}.png")
    out = tmp_path / "out"
    code = main(["train", "presets/LoRA.json", "--model", "tiny-sd1", "--lora-dir", str(out), "--quiet",
                 *_tiny_lora_sets(data, 2, "here"), "--set", "effect_check=false"])
    assert code == 0
    logs = list((out / "logs").rglob("here-*.csv"))
    assert len(logs) == 1  # not in the install folder's logs/
    printed = capsys.readouterr().out
    assert f"Logs and previews: {logs[0].parent}" in printed
