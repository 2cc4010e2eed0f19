"""Widgets <-> Settings by key, block narrowing and the pass-2 copy (no gradio, no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.presets import list_presets, load_preset
from trainer.settings import FIELDS, Settings
from trainer.ui import form

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def _round_trip(settings: Settings) -> Settings:
    first, second, job = form.widget_values(settings)
    return form.settings_from_ui(first, second, job)


def test_every_field_has_exactly_one_widget_slot():
    first = {f.key for f in form.pass1_fields()}
    job = {f.key for f in form.job_fields()}
    second = {f.key for f in form.pass2_fields()}
    assert first | job | {form.USE_PASS2_KEY} == {f.key for f in FIELDS}
    assert not first & job
    assert second == {f.key for f in FIELDS if f.pass2}
    assert form.USE_PASS2_KEY in second and form.USE_PASS2_KEY not in first


@pytest.mark.parametrize("name", list_presets(PRESETS))
def test_preset_round_trips_through_the_widgets(name):
    settings, _ = load_preset(name, PRESETS)
    back = _round_trip(settings)
    assert back.raw == settings.raw
    assert back.for_pass(2).raw == settings.for_pass(2).raw
    assert (back.pass2 is None) == (settings.pass2 is None or not settings.pass2.use_2nd_pass_settings)


def test_changed_widget_values_reach_settings_by_key():
    first, second, job = form.widget_values(Settings.from_layers({}))
    first.update({"network_rank": "32", "train_learning_rate": "3e-4", "image_size(height, width)": "512,768",
                  "image_mirroring": True, form.BLOCKS_KEY: ["BASE", "IN01", "M00"]})
    job.update({"mode": "iLECO", "model": "tiny-sd1", "vae": form.NO_VAE, "original prompt": "cat"})
    assert job["te"] == form.NO_VAE  # "None" in the dropdown: the checkpoint's own text encoder
    s = form.settings_from_ui(first, second, job)
    assert s.te == ""
    job["te"] = "qwen_3_4b.safetensors"
    assert form.settings_from_ui(first, second, job).te == "qwen_3_4b.safetensors"
    job["te"] = form.NO_VAE
    assert (s.network_rank, s.train_learning_rate, s.image_size) == (32, 3e-4, (512, 768))
    assert s.image_mirroring is True and s.network_blocks == ("BASE", "IN01", "M00")
    assert (s.mode, s.model, s.vae, s.original_prompt) == ("iLECO", "tiny-sd1", "", "cat")
    assert s.pass2 is None


def test_pass2_values_are_sent_only_when_ticked_in_difference():
    first, second, job = form.widget_values(Settings.from_layers({"mode": "Difference"}))
    second.update({"network_rank": "4", "train_iterations": "50"})
    assert form.settings_from_ui(first, second, job).pass2 is None
    second[form.USE_PASS2_KEY] = True
    s = form.settings_from_ui(first, second, job)
    assert (s.for_pass(2).network_rank, s.for_pass(2).train_iterations) == (4, 50)
    assert (s.network_rank, s.train_iterations) == (16, 1000)
    job["mode"] = "LoRA"
    assert form.settings_from_ui(first, second, job).pass2 is None


def test_copy_from_pass1_copies_every_key_but_the_switch():
    first, _, _ = form.widget_values(Settings.from_layers({"network_type": "c3lier", "network_rank": "64"}))
    copied = form.copy_pass1(first)
    assert set(copied) == {f.key for f in form.pass2_fields()} - {form.USE_PASS2_KEY}
    assert copied["network_type"] == "c3lier" and copied["network_rank"] == "64"  # the reference skipped network_type


@pytest.mark.parametrize(
    ("family", "network_type", "count", "absent"),
    [("sd", "lierla", 17, "IN03"), ("sd", "c3lier", 25, "IN00"), ("sd", "loha", 25, "IN00"),
     ("sdxl", "lierla", 12, "IN01"), ("sdxl", "c3lier", 19, "IN09")],
)
def test_block_lists_match_the_family(family, network_type, count, absent):
    blocks = form.blocks_for(family, network_type)
    assert len(blocks) == count and blocks[0] == "BASE" and "M00" in blocks and absent not in blocks


def test_family_from_name_or_host():
    assert form.family_of("tiny-sdxl") == "sdxl" and form.family_of("models/animagineXL3.safetensors") == "sdxl"
    assert form.family_of("tiny-sd1") == "sd" and form.family_of("") == "sd"

    class Host:
        def model_family(self, model):
            return "SDXL"

    assert form.family_of("mystery.safetensors", Host()) == "sdxl"


def test_narrowing_keeps_all_or_the_surviving_ticks():
    sd_all, xl_attn = form.blocks_for("sd", "c3lier"), form.blocks_for("sdxl", "lierla")
    assert form.narrow_blocks(sd_all, sd_all, xl_attn) == xl_attn
    assert form.narrow_blocks(["BASE", "IN03", "IN04", "OUT09"], sd_all, xl_attn) == ["BASE", "IN04"]


def test_numbers_show_as_typed():
    assert [form.format_number(v) for v in (8.0, 0.5, 16, 0.03125, "1e-4")] == ["8", "0.5", "16", "0.03125", "1e-4"]


def test_groups_split_into_columns_of_about_equal_height():
    for group in ("dataset", "network", "optimizer", "noise", "saving", "advanced"):
        fields = [f for f in form.group_fields(form.pass1_fields(), group) if f.widget != "checkboxgroup"]
        cols = form.balanced_columns(fields)
        assert [f for c in cols for f in c] == fields  # table order kept, nothing lost
        heights = [sum(form._height(f) for f in c) for c in cols]
        # the tallest column is within one field of the mean (the old fixed columns ran 1,300 px apart)
        assert max(heights) - sum(heights) / 3 <= max(form._height(f) for f in fields), (group, heights)


def test_group_title_says_what_differs_from_the_modes_defaults():
    keys = [f.key for f in form.group_fields(form.pass1_fields(), "network")]
    values = {k: form.widget_value(next(f for f in FIELDS if f.key == k), next(f for f in FIELDS if f.key == k).default)
              for k in keys}
    values[form.BLOCKS_KEY] = form.blocks_for("sdxl", "lierla")  # all blocks a family has = the default
    assert form.changed_in_group("network", "LoRA", values) == "Network · defaults"
    values["network_alpha"] = "4"
    values["network_type"] = "loha"
    assert form.changed_in_group("network", "LoRA", values) == "Network · 2 changed: Network type loha, Alpha 4"
    # ADDifT's alpha default is 1: 4 is still a change there, 1 is not
    values["network_alpha"] = "1"
    assert form.changed_in_group("network", "ADDifT", values) == "Network · 1 changed: Network type loha"


def test_each_mode_hides_the_groups_it_does_not_use():
    assert not form.group_visible("dataset", "iLECO")
    assert form.group_visible("dataset", "LoRA")
    assert not form.is_visible(next(f for f in FIELDS if f.key == "lora_data_directory"), "Difference")
