"""Preset store and settings snapshots: shipped and reference-style presets load unchanged."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from trainer.errors import InputError, SettingsError
from trainer.presets import (
    PRESET_DIR,
    find_snapshot,
    list_presets,
    list_snapshots,
    load_preset,
    save_preset,
    write_snapshot,
)
from trainer.settings import BLOCK_IDS, Settings

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "reference_presets"
NAMES = ["ADDifT_Action_SD1.5", "ADDifT_Action_XL", "ADDifT_Style_SD1.5", "ADDifT_Style_XL", "Difference",
         "Difference_Use2ndPass", "LoRA", "iLECO"]
NO_BASE = BLOCK_IDS[1:]
# §19.1: mode, rank, alpha, iterations, batch, lr, optimizer, scheduler, min/max t, snr, seed, strength, revert, json
EXPECTED = {
    "LoRA": ("LoRA", 16, 8.0, 1000, 2, 1e-4, "AdamW", "cosine", 0, 1000, 5.0, -1, 1.0, False, False),
    "iLECO": ("iLECO", 4, 8.0, 300, 2, 5e-4, "AdamW", "cosine", 0, 1000, 5.0, -1, 1.0, False, False),
    "Difference": ("Difference", 16, 16.0, 500, 2, 5e-4, "AdamW", "cosine", 0, 1000, 5.0, -1, 1.0, False, False),
    "Difference_Use2ndPass": ("Difference", 16, 16.0, 500, 2, 5e-4, "AdamW", "cosine", 0, 1000, 5.0, -1, 1.0, False,
                              False),
    "ADDifT_Action_SD1.5": ("ADDifT", 4, 1.0, 30, 1, 1e-4, "CAME", "cosine_annealing", 500, 1000, 5.0, 1, 1.0, False,
                            True),
    "ADDifT_Action_XL": ("ADDifT", 4, 1.0, 30, 1, 2e-4, "CAME", "cosine_annealing", 500, 1000, 5.0, 1, 1.0, False,
                         True),
    "ADDifT_Style_SD1.5": ("ADDifT", 4, 1.0, 50, 1, 5e-5, "CAME", "cosine_annealing", 200, 400, 5.0, 1, 5.0, True,
                           True),
    "ADDifT_Style_XL": ("ADDifT", 4, 1.0, 30, 1, 2e-4, "CAME", "cosine_annealing", 200, 400, 1.0, -1, 2.0, True, True),
}


def _summary(s: Settings) -> tuple:
    return (s.mode, s.network_rank, s.network_alpha, s.train_iterations, s.train_batch_size,
            pytest.approx(s.train_learning_rate), s.train_optimizer, s.train_lr_scheduler, s.train_min_timesteps,
            s.train_max_timesteps, s.train_snr_gamma, s.train_seed, s.network_strength,
            s.diff_revert_original_target, s.save_as_json)


def test_shipped_presets_are_listed_sorted():
    assert list_presets() == sorted(NAMES, key=str.lower)
    assert list_presets(REFERENCE_DIR) == list_presets()


@pytest.mark.parametrize("folder", [PRESET_DIR, REFERENCE_DIR], ids=["ours", "reference"])
@pytest.mark.parametrize("name", NAMES)
def test_presets_load_with_expected_values(folder, name):
    s, warnings = load_preset(name, folder)
    assert _summary(s) == EXPECTED[name]
    assert s.network_type == "lierla" and s.network_element == "Full" and s.image_buckets_step == 256
    assert (s.image_min_length, s.image_max_ratio) == (512, 2.0)
    assert (s.train_model_precision, s.train_lora_precision, s.save_precision) == ("fp16", "fp32", "fp16")
    assert s.model == "" and s.vae == ""
    assert s.network_blocks == (NO_BASE if name.endswith("_XL") else BLOCK_IDS)
    if name.startswith("ADDifT"):
        assert s.train_lr_scheduler_settings == {"eta_min": 0.00001}
    if folder == PRESET_DIR:
        assert warnings == [] and s.logging_save_csv is True
    else:  # older reference files carry the removed transparent-background key (value False: no warning)
        assert s.logging_save_csv is False and warnings == []


def test_reference_2nd_pass_nesting():
    s, _ = load_preset("Difference_Use2ndPass", REFERENCE_DIR)
    p2 = s.for_pass(2)
    assert (p2.network_rank, p2.network_alpha, p2.train_iterations) == (4, 4.0, 500)
    assert p2.train_learning_rate == pytest.approx(1e-4)
    assert load_preset("Difference", REFERENCE_DIR)[0].pass2 is None


def test_reference_files_are_in_reference_style():
    raw = json.loads((REFERENCE_DIR / "LoRA.json").read_text())
    assert raw["network_rank"] == "16" and raw["train_learning_rate"] == "1e-4" and raw["vae"] == "None"
    assert raw["logging_save_csv"] == "" and "network_element" not in raw and raw["train_optimizer"] == "adamw"
    assert "network_strength" not in raw  # older preset: HEAD-only key absent


@pytest.mark.parametrize("name", NAMES)
def test_shipped_presets_are_our_exact_output(name):
    s, _ = load_preset(name)
    assert (PRESET_DIR / f"{name}.json").read_text(encoding="utf-8") == s.to_json()


def test_save_and_load_round_trip(tmp_path):
    s = Settings.from_layers({"save_lora_name": "mine", "network_rank": 8, "train_learning_rate": "2e-5"})
    path = save_preset(s, None, tmp_path)
    assert path == tmp_path.resolve() / "mine.json"
    back, warnings = load_preset("mine.json", tmp_path)
    assert back == s and warnings == []
    with pytest.raises(InputError, match="exists"):
        save_preset(s, "mine", tmp_path, overwrite=False)
    save_preset(s.replace(network_rank=4), "mine", tmp_path)
    assert load_preset("mine", tmp_path)[0].network_rank == 4
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]  # no temp files left


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
def test_preset_names_stay_inside(tmp_path, name):
    with pytest.raises(SettingsError):
        save_preset(Settings.from_layers(), name, tmp_path / "presets")
    assert not (tmp_path / "escape.json").exists()


def test_missing_and_broken_presets(tmp_path):
    (tmp_path / "good.json").write_text("{}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="good"):
        load_preset("nope", tmp_path)
    with pytest.raises(InputError, match="not valid JSON"):
        load_preset("bad", tmp_path)
    assert list_presets(tmp_path / "absent") == []


def test_snapshots_are_dated_and_never_overwritten(tmp_path):
    s = Settings.from_layers({"save_lora_name": "run"})
    when = datetime(2025, 3, 4, 5, 6, 7)
    first = write_snapshot(s, tmp_path, when)
    second = write_snapshot(s.replace(network_rank=4), tmp_path, when)
    assert first.relative_to(tmp_path.resolve()).as_posix() == "20250304/run-20250304_050607.json"
    assert second.name == "run-20250304_050607_1.json"
    assert load_preset("run-20250304_050607", first.parent)[0].network_rank == 16
    later = write_snapshot(s, tmp_path, datetime(2025, 3, 5))
    assert list_snapshots(tmp_path) == [later, second, first]
    assert find_snapshot("run-20250304_050607_1", tmp_path) == second
    assert find_snapshot("run-20250304_050607.json", tmp_path) == first
    with pytest.raises(InputError):
        find_snapshot("nothing", tmp_path)
    with pytest.raises(SettingsError):
        find_snapshot("../run-20250304_050607", tmp_path / "20250304")


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symlinks")
def test_find_snapshot_ignores_links_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    root = tmp_path / "json"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert list_snapshots(root) == []
    with pytest.raises(InputError):
        find_snapshot("secret", root)
