"""Catalogue, part 1: bad input on the command line.

Every case runs the real CLI (``trainer.__main__.main``) and expects exit code 2, one ``error:`` line on
stderr naming the field (or path) and the fix, and nothing written to the LoRA folder. These cases are
all caught before any model is loaded, so each takes milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trainer.__main__ import main

from .helpers import assert_clear, assert_no_partial

PWNED = "PWNED_by_settings"


def base_args(tmp: Path, data: Path, *, mode: str = "LoRA") -> list[str]:
    return [
        "train", "--mode", mode, "--model", "tiny-sd1", "--lora-dir", str(tmp / "lora"), "--quiet",
        "--logs-dir", str(tmp / "logs"), "--json-dir", str(tmp / "json"),
        "--set", f"lora_data_directory={data}", "--set", "save_lora_name=cli_case",
        "--set", "image_size(height, width)=64", "--set", "image_buckets_step=32", "--set", "image_min_length=32",
        "--set", "train_iterations=2", "--set", "train_batch_size=1", "--set", "train_model_precision=fp32",
    ]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# case id -> (extra CLI args, field named in the message, words of the fix)
CASES: dict[str, tuple[list[str], str, str]] = {
    "data folder empty setting": (sets("lora_data_directory="), "lora_data_directory", "give its path"),
    "min timestep >= max": (sets("train_min_timesteps=600", "train_max_timesteps=400"), "train_min_timesteps", "lower it"),
    "min timestep == max": (sets("train_min_timesteps=500", "train_max_timesteps=500"), "train_min_timesteps", "lower it"),
    "max timestep > 1000": (sets("train_max_timesteps=1001"), "train_max_timesteps", "use e.g. 1000"),
    "bucket step 0": (sets("image_buckets_step=0"), "image_buckets_step", "use e.g. 64"),
    "bucket step > size": (sets("image_buckets_step=128"), "image_buckets_step", "use e.g. 64"),
    "image size not multiple of 8": (sets("image_size(height, width)=60"), "image_size", "multiple of 8"),
    "image size text": (sets("image_size(height, width)=big"), "image_size", "type e.g. 512"),
    "rank 0": (sets("network_rank=0"), "network_rank", "use e.g. 16"),
    "rank negative": (sets("network_rank=-4"), "network_rank", "use e.g. 16"),
    "rank fractional": (sets("network_rank=2.5"), "network_rank", "whole number"),
    "alpha 0": (sets("network_alpha=0"), "network_alpha", "half the rank"),
    "batch 0": (sets("train_batch_size=0"), "train_batch_size", "use e.g. 2"),
    "iterations 0": (sets("train_iterations=0"), "train_iterations", "use e.g. 1000"),
    "learning rate abc": (sets("train_learning_rate=abc"), "train_learning_rate", "type e.g. 1e-4"),
    "learning rate 0": (sets("train_learning_rate=0"), "train_learning_rate", "use e.g. 1e-4"),
    "learning rate nan": (sets("train_learning_rate=nan"), "train_learning_rate", "finite number"),
    "iterations abc": (sets("train_iterations=abc"), "train_iterations", "type e.g. 1000"),
    "bool garbage": (sets("save_overwrite=maybe"), "save_overwrite", "true/false"),
    "separator as optimizer": (sets("train_optimizer=" + "-" * 26), "train_optimizer", "choose a real optimizer"),
    "unknown optimizer": (sets("train_optimizer=SuperAdam"), "train_optimizer", "choose one of"),
    "unknown scheduler": (sets("train_lr_scheduler=wobbly"), "train_lr_scheduler", "choose one of"),
    "unknown precision": (sets("train_model_precision=fp64"), "train_model_precision", "choose one of"),
    "optimizer settings not a literal": (
        sets(f"train_optimizer_settings=x=__import__('os').system('touch {PWNED}')"),
        "train_optimizer_settings", "not a Python literal"),
    "optimizer settings not name=value": (sets("train_optimizer_settings=weight_decay"), "train_optimizer_settings",
                                           "write e.g. weight_decay=0.01"),
    "scheduler settings not a literal": (sets("train_lr_scheduler_settings=gamma=open('x')"),
                                         "train_lr_scheduler_settings", "not a Python literal"),
    "unknown block": (sets("network_blocks(BASE = TextEncoder)=IN99"), "network_blocks", "choose from"),
    "no block": (sets("network_blocks(BASE = TextEncoder)="), "network_blocks", "tick at least one block"),
    "no block (attribute name)": (sets("network_blocks="), "network_blocks", "tick at least one block"),
    "save name with /": (sets("save_lora_name=sub/evil"), "save_lora_name", "plain name"),
    "save name with \\": (sets("save_lora_name=sub\\evil"), "save_lora_name", "plain name"),
    "save name ..": (sets("save_lora_name=.."), "save_lora_name", "plain name"),
    "save name ../x": (sets("save_lora_name=../escape"), "save_lora_name", "plain name"),
    "save name absolute": (sets("save_lora_name=/tmp/evil"), "save_lora_name", "plain name"),
    "save name drive": (sets("save_lora_name=C:evil"), "save_lora_name", "plain name"),
    "save name bad char": (sets("save_lora_name=a?b"), "save_lora_name", "file names cannot hold"),
    "unknown setting key": (sets("network_rnak=8"), "network_rnak", "did you mean network_rank"),
    "--set without =": (["--set", "network_rank"], "network_rank", "write e.g. --set network_rank=8"),
    "unknown mode": (["--mode", "Dreambooth"], "mode", "choose one of"),
    "multi-addift empty suffix": (["--mode", "Multi-ADDifT"] + sets("diff_target_name="), "diff_target_name",
                                  "e.g. _after"),
    "ileco empty prompt": (["--mode", "iLECO", "--original-prompt", " "], "original prompt", "e.g. 'red hair'"),
    "addift without target": (["--mode", "ADDifT", "--original-image", "o.png"], "target image",
                              "needs an original and a target image"),
    "difference pass 2 bad": (["--mode", "Difference", "--original-image", "o.png", "--target-image", "t.png"]
                              + sets("use_2nd_pass_settings=true", "2nd pass.use_2nd_pass_settings=true",
                                     "2nd pass.network_rank=0"), "2nd pass.network_rank", "use e.g. 16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_cli_input_gives_one_clear_line(case, tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra, field, fix = CASES[case]
    code = main(base_args(tmp_path, dataset) + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: "), err
    assert_clear(err, field, fix)
    assert not any((tmp_path / "lora").glob("*")), "nothing may be written for bad input"
    assert not Path(PWNED).exists() and not (tmp_path / PWNED).exists()
    assert_no_partial(tmp_path)


def test_settings_string_is_never_evaluated(tmp_path, dataset, capsys, monkeypatch):
    """The classic injection through every kwargs field: no file appears, each is refused by name."""
    monkeypatch.chdir(tmp_path)
    payload = f"__import__('os').system('touch {tmp_path / PWNED}')"
    for key in ("train_optimizer_settings", "train_lr_scheduler_settings"):
        for text in (f"x={payload}", payload, f"x=({payload},)", f"x=[{payload}]"):
            code = main(base_args(tmp_path, dataset) + sets(f"{key}={text}"))
            err = capsys.readouterr().err
            assert code == 2 and key in err, err
    assert not (tmp_path / PWNED).exists()
    assert not os.path.exists(PWNED)


def test_existing_output_without_overwrite_is_refused_before_loading(tmp_path, dataset, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    existing = lora / "cli_case.safetensors"
    existing.write_bytes(b"previous good file")
    code = main(base_args(tmp_path, dataset))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert_clear(err, "save_overwrite", "tick save_overwrite or change save_lora_name")
    assert existing.read_bytes() == b"previous good file"


@pytest.mark.parametrize("content", ["missing", "not json {", "[1, 2]", '{"network_rank": "many"}', "\xff\xfe"])
def test_bad_preset_file_gives_one_clear_line(content, tmp_path, dataset, capsys):
    preset = tmp_path / "preset.json"
    if content != "missing":
        preset.write_bytes(content.encode("latin-1"))
    code = main(["train", str(preset)] + base_args(tmp_path, dataset)[1:])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    field = {"[1, 2]": "json", '{"network_rank": "many"}': "network_rank"}.get(content, "preset.json")
    assert_clear(err, field, {"[1, 2]": "expected a JSON object", '{"network_rank": "many"}': "type e.g. 16"}.get(
        content, "give a preset file"))


def test_result_json_is_written_atomically_and_names_outcome(tmp_path, dataset, capsys):
    """The one CLI case that trains: a good run prints its path and writes a complete result JSON."""
    out = tmp_path / "result.json"
    code = main(base_args(tmp_path, dataset) + sets("effect_check=false", "logging_save_csv=false")
                + ["--result-json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert result["status"] == "done" and result["steps"] == 2
    assert result["lora_path"] in printed
    assert_no_partial(tmp_path)
