"""The settings table: coercion, layering, JSON round trip, pass 2, validation, CLI items."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.errors import SettingsError
from trainer.settings import (
    BLOCK_IDS,
    FIELD_BY_KEY,
    FIELDS,
    LEGACY_KEYS,
    MODES,
    OPTIMIZERS,
    SEPARATOR,
    Settings,
    fields_for,
    parse_kwargs,
    parse_set_args,
    settings_markdown,
    validate,
)

REFERENCE_KEYS = [f.key for f in FIELDS][:59]
SIZE, BLOCKS = "image_size(height, width)", "network_blocks(BASE = TextEncoder)"


def test_table_has_the_59_reference_keys_in_export_order_then_additions_then_job_keys():
    assert len(FIELDS) == len(FIELD_BY_KEY)  # no duplicate key
    assert REFERENCE_KEYS[:3] == ["network_type", "network_rank", "network_alpha"]
    assert REFERENCE_KEYS[6] == SIZE and REFERENCE_KEYS[16] == BLOCKS
    assert REFERENCE_KEYS[31] == "train_fixed_timsteps_in_batch"  # reference typo kept in the key
    assert REFERENCE_KEYS[-1] == "use_2nd_pass_settings"
    job = [f.key for f in FIELDS if f.section == "job"]
    assert job == ["mode", "model", "vae", "te", "original prompt", "target prompt", "negative prompt",
                   "original image", "target image"]
    assert [f.key for f in FIELDS[-len(job):]] == job


def test_field_attr_label_and_choices():
    assert FIELD_BY_KEY[SIZE].attr == "image_size"
    assert FIELD_BY_KEY[BLOCKS].attr == "network_blocks"
    assert FIELD_BY_KEY["original prompt"].attr == "original_prompt"
    assert FIELD_BY_KEY["network_rank"].label == "Rank"  # labels in words; the key stays in the help
    assert FIELD_BY_KEY["train_learning_rate"].label == "Learning rate"
    assert FIELD_BY_KEY["lora_data_directory"].label == "Image folder"
    labels = [f.label for f in FIELDS]
    assert len(labels) == len(set(labels)) and not [f.key for f in FIELDS if "_" in f.label and f.label == f.key]
    from trainer.settings import GROUPS, OPTIONAL_GROUPS

    assert {f.group for f in FIELDS} == set(GROUPS) and set(OPTIONAL_GROUPS) < set(GROUPS)
    assert OPTIMIZERS.count("-" * 26) == 4 and OPTIMIZERS[5] == SEPARATOR
    assert FIELD_BY_KEY["network_alpha"].choices[0] == 0.03125 and FIELD_BY_KEY["network_alpha"].choices[-1] == 1024.0
    assert FIELD_BY_KEY["network_conv_rank"].choices[:2] == (0, 4)
    assert FIELD_BY_KEY["network_type"].choices == ("lierla", "c3lier", "loha", "lokr", "dora")
    assert len(FIELD_BY_KEY["train_lr_scheduler"].choices) == 15
    assert all(f.help for f in FIELDS)
    assert "noise latent" in FIELD_BY_KEY[SIZE].help
    assert "BASE" in FIELD_BY_KEY["network_train_text_encoder"].help


def test_modes_and_pass2_columns():
    assert "ADDifT" in FIELD_BY_KEY["original prompt"].modes  # §17 #36: prompts condition these modes
    assert FIELD_BY_KEY["original prompt"].modes == frozenset({"iLECO", "Difference", "ADDifT", "Multi-ADDifT"})
    assert FIELD_BY_KEY["train_textencoder_learning_rate"].modes == frozenset({"LoRA"})
    assert FIELD_BY_KEY["network_rank"].pass2 and not FIELD_BY_KEY["save_lora_name"].pass2
    assert not any(FIELD_BY_KEY[k].pass2 for k in ("lora_data_directory", SIZE, "logging_save_csv", "diff_alt_ratio"))
    assert [f.key for f in fields_for("iLECO", "pass2")] == []
    assert "diff_target_name" in [f.key for f in fields_for("Multi-ADDifT")]
    assert "diff_target_name" not in [f.key for f in fields_for("LoRA")]
    with pytest.raises(SettingsError):
        fields_for("Lora")


def test_defaults_are_typed():
    s = Settings.from_layers()
    assert (s.network_rank, s.network_alpha, s.image_size) == (16, 8.0, (512, 512))
    assert isinstance(s.network_alpha, float) and s.train_learning_rate == pytest.approx(1e-4)
    assert s.network_blocks == BLOCK_IDS and s.train_optimizer_settings == {}
    assert s.train_textencoder_learning_rate is None and s.train_seed == -1
    assert (s.mode, s.save_lora_name, s.pass2) == ("LoRA", "untitled", None)
    assert s.logging_save_csv is True and s.network_element == "Full"


def test_layers_later_win_and_strings_are_coerced():
    s = Settings.from_layers({"network_rank": 8}, {"network_rank": "32", SIZE: "768, 512"}, {"train_seed": "7"})
    assert (s.network_rank, s.image_size, s.train_seed) == (32, (768, 512), 7)  # not sorted
    assert Settings.from_layers({"image_size": 640}).image_size == (640, 640)
    assert Settings.from_layers({"network_blocks": ["OUT01", "base"]}).network_blocks == ("BASE", "OUT01")
    assert Settings.from_layers({"train_textencoder_learning_rate": "5e-5"}).train_textencoder_learning_rate == 5e-5
    assert Settings.from_layers({"save_lora_name": " mine "}).save_lora_name == "mine"


@pytest.mark.parametrize("text", ["false", "False", "0", "", "off", None])
def test_false_words_are_false(text):
    assert Settings.from_layers({"image_mirroring": text}).image_mirroring is False


@pytest.mark.parametrize("text", ["true", "True", "1", True])
def test_true_words_are_true(text):
    assert Settings.from_layers({"image_mirroring": text}).image_mirroring is True


@pytest.mark.parametrize(("key", "value"), [
    ("network_rank", "sixteen"), ("network_rank", "16.5"), ("network_alpha", "nan"), ("train_batch_size", True),
    ("image_mirroring", "maybe"), (SIZE, "512,512,512"), (SIZE, "big"), (BLOCKS, ["IN99"]),
    ("train_learning_rate", "fast"), ("mode", "LECO"), ("train_optimizer_settings", "lr"),
])  # fmt: skip
def test_coercion_errors_name_the_key(key, value):
    with pytest.raises(SettingsError) as err:
        Settings.from_layers({key: value})
    assert err.value.key == key and str(err.value).startswith(key)


def test_unknown_key_in_layers_raises_with_close_match():
    with pytest.raises(SettingsError, match="network_rank"):
        Settings.from_layers({"network_rnak": 4})


def test_settings_is_immutable_and_replace_copies():
    s = Settings.from_layers()
    with pytest.raises(AttributeError):
        s.network_rank = 4  # type: ignore[misc]
    t = s.replace(network_rank=4, image_size=(640, 512))
    assert (t.network_rank, t.image_size, s.network_rank) == (4, (640, 512), 16)
    assert t.raw[SIZE] == "640,512"
    with pytest.raises(AttributeError, match="network_rank"):
        _ = s.network_rnak


def test_round_trip_is_identity():
    s = Settings.from_layers(
        {"mode": "Difference", "train_learning_rate": "3e-5", SIZE: "768,512", "train_optimizer": "adamw",
         "train_optimizer_settings": "betas=(0.9, 0.99); weight_decay=0.01", "original prompt": "a cat",
         "2nd pass": {"use_2nd_pass_settings": True, "network_rank": 4, "train_learning_rate": "1e-5"}})
    data = json.loads(s.to_json())
    back, warnings = Settings.from_json_dict(data)
    assert back == s and warnings == []
    assert data["train_learning_rate"] == "3e-5"  # text kept, not 3e-05
    assert data["train_optimizer"] == "AdamW"
    assert list(data)[-7:] == ["2nd pass", "mode", "model", "vae", "te", "original prompt", "target prompt"]
    assert "negative prompt" not in data and "original image" not in data
    assert "2nd pass" not in Settings.from_layers().to_json_dict()  # Difference only


def test_pass2_overrides_only_pass2_keys():
    s = Settings.from_layers({"mode": "Difference", "save_lora_name": "one", "train_iterations": 500},
                             {"2nd pass": {"use_2nd_pass_settings": True, "network_rank": 4, "train_iterations": 50,
                                           "save_lora_name": "two", "diff_save_1st_pass": True}})
    p2 = s.for_pass(2)
    assert (p2.network_rank, p2.train_iterations) == (4, 50)
    assert p2.save_lora_name == "one" and p2.diff_save_1st_pass is False  # not overridable
    assert s.for_pass(1) is s


def test_pass2_unticked_means_pass1_unchanged():
    s = Settings.from_layers({"mode": "Difference", "2nd pass": {"network_rank": 4}})
    assert s.pass2 is not None and s.pass2.network_rank == 4
    assert s.for_pass(2) is s and s.for_pass(2).network_rank == 16


def test_pass2_coercion_error_is_prefixed():
    with pytest.raises(SettingsError) as err:
        Settings.from_layers({"mode": "Difference", "2nd pass": {"network_rank": "x"}})
    assert err.value.key == "2nd pass.network_rank"


def test_from_json_warnings_for_unknown_and_legacy_keys():
    s, warnings = Settings.from_json_dict({"network_rank": "8", "frobnicate": 1, "train_fixed_timesteps_in_batch": True,
                                           "image_use_transparent_background_ajust": True, "te": "None"})
    assert s.network_rank == 8 and s.train_fixed_timsteps_in_batch is True
    assert s.te == ""  # the reference (HEAD) job key: "None" = no separate text encoder, no warning
    assert len(warnings) == 3
    assert any(w.startswith("frobnicate: unknown") for w in warnings)
    assert all(new is None or new in FIELD_BY_KEY for new, _ in LEGACY_KEYS.values())


def test_from_json_rejects_non_object():
    with pytest.raises(SettingsError):
        Settings.from_json_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# -- parse_kwargs


@pytest.mark.parametrize(("text", "expected"), [
    ("", {}),
    ("weight_decay=0.01", {"weight_decay": 0.01}),
    ("betas=(0.9,0.99)\neps = 1e-8", {"betas": (0.9, 0.99), "eps": 1e-8}),
    ("milestones=[100, 200]; gamma=-0.5", {"milestones": [100, 200], "gamma": -0.5}),
    ("name='a;b'; flag=True; none=None", {"name": "a;b", "flag": True, "none": None}),
])  # fmt: skip
def test_parse_kwargs_literals(text, expected):
    assert parse_kwargs(text, "train_optimizer_settings") == expected


@pytest.mark.parametrize("text", ["mode=min", "x=1+", "1x=2", "a=1;a=2", "novalue", "x="])
def test_parse_kwargs_errors_name_key_and_fix(text):
    with pytest.raises(SettingsError) as err:
        parse_kwargs(text, "train_lr_scheduler_settings")
    assert err.value.key == "train_lr_scheduler_settings"


def test_parse_kwargs_unquoted_word_suggests_quotes():
    with pytest.raises(SettingsError, match=r"quote strings: mode='x'"):
        parse_kwargs("mode=min", "k")


def test_parse_kwargs_never_evaluates(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(SettingsError):
        parse_kwargs(f"x=__import__('os').mkdir({str(marker)!r})", "k")
    with pytest.raises(SettingsError):
        parse_kwargs("x=__import__('os')", "k")
    assert not marker.exists()


# -- validate


def _errors(**layer):
    return {e.key: str(e) for e in validate(Settings.from_layers(layer))}


def test_valid_settings_per_mode_have_no_problems():
    ok = {"lora_data_directory": "/data", "diff_target_name": "_after", "original prompt": "cat",
          "original image": "a.png", "target image": "b.png"}
    for mode in MODES:
        assert _errors(**ok, mode=mode) == {}, mode


@pytest.mark.parametrize(("layer", "key", "words"), [
    ({"network_rank": 0}, "network_rank", "outside 1..1024"),
    ({"network_rank": 100000}, "network_rank", "100000 is outside 1..1024"),  # wrote a 1.25 GB LoRA before
    ({"network_strength": -1}, "network_strength", "outside > 0"),  # crashed at save time, after the run
    ({"network_strength": 0}, "network_strength", "outside > 0"),  # saved an all-zero LoRA
    ({"network_type": "dora", "network_strength": 2}, "network_strength", "dora"),  # crashed at save time
    ({"caption_dropout_rate": 1.5}, "caption_dropout_rate", "0..1"),
    ({"train_lr_warmup_steps": -5}, "train_lr_warmup_steps", ">= 0"),
    ({SIZE: "16384"}, SIZE, "8-8192"),
    ({"network_alpha": 0}, "network_alpha", "> 0"),
    ({"train_min_timesteps": 600, "train_max_timesteps": 500}, "train_min_timesteps", "not below"),
    ({"train_max_timesteps": 1200}, "train_max_timesteps", "0..1000"),
    ({"image_buckets_step": 0}, "image_buckets_step", "> 0"),
    ({"image_buckets_step": 576, SIZE: "512"}, "image_buckets_step", "smaller image side"),
    ({SIZE: "500"}, SIZE, "multiple of 8"),
    ({"image_min_length": 1024}, "image_min_length", "larger image side"),
    ({"train_batch_size": 0}, "train_batch_size", "outside 1..1024"),
    ({"train_iterations": 0}, "train_iterations", "outside 1.."),
    ({"train_learning_rate": "0"}, "train_learning_rate", "> 0"),
    ({"train_optimizer": SEPARATOR}, "train_optimizer", "choose a real optimizer, not the separator line"),
    ({"train_optimizer": "adamw9bit"}, "train_optimizer", "AdamW8bit"),
    ({"train_lr_scheduler": "warp"}, "train_lr_scheduler", "cosine_annealing"),
    ({"save_lora_name": "../evil"}, "save_lora_name", "plain name"),
    ({"lora_data_directory": ""}, "lora_data_directory", "is empty"),
    ({"train_model_precision": "fp8"}, "train_model_precision", "choose one of"),
    ({"save_precision": "int8"}, "save_precision", "choose one of"),
    ({BLOCKS: []}, BLOCKS, "no block"),
])  # fmt: skip
def test_validate_catches(layer, key, words):
    errors = _errors(**{"lora_data_directory": "/data", **layer})
    assert key in errors and words in errors[key]
    assert errors[key].startswith(f"{key}: ") and ";" in errors[key]


def test_ranges_apply_only_in_the_modes_of_their_field_and_to_pass_2():
    assert "diff_alt_ratio" in _errors(mode="ADDifT", diff_alt_ratio=1000, **{"original image": "a", "target image": "b"})
    assert "diff_alt_ratio" not in _errors(diff_alt_ratio=1000)  # a LoRA job does not read it
    pass2 = _errors(mode="Difference", **{"original image": "a", "target image": "b",
                                          "2nd pass": {"use_2nd_pass_settings": True, "network_rank": 5000}})
    assert "2nd pass.network_rank" in pass2 and "network_rank" not in pass2


def test_every_range_is_shown_in_the_readme_table():
    table = settings_markdown()
    for f in FIELDS:
        if f.range_text:
            row = next(r for r in table.splitlines() if r.startswith(f"| `{f.key.replace('|', '')}`"))
            assert f"range {f.range_text}" in row, f.key


def test_validate_reports_all_problems_at_once():
    errors = _errors(network_rank=0, train_batch_size=0, train_iterations=0)
    assert {"network_rank", "train_batch_size", "train_iterations", "lora_data_directory"} <= set(errors)


def test_validate_mode_specific_requirements():
    assert "diff_target_name" in _errors(mode="Multi-ADDifT", lora_data_directory="/d")
    assert "original prompt" in _errors(mode="iLECO")
    assert {"original image", "target image"} <= set(_errors(mode="ADDifT"))
    assert {"original image", "target image"} <= set(_errors(mode="Difference"))


def test_validate_ignores_fields_irrelevant_to_the_mode():
    # iLECO does not use buckets or the data folder; ADDifT does not use image_size.
    assert _errors(mode="iLECO", **{"original prompt": "cat", "image_buckets_step": 0}) == {}
    assert _errors(mode="ADDifT", **{"original image": "a", "target image": "b", SIZE: "500"}) == {}


def test_validate_checks_pass2_values_in_use():
    s = Settings.from_layers({"mode": "Difference", "original image": "a", "target image": "b",
                              "2nd pass": {"use_2nd_pass_settings": True, "network_rank": 0}})
    assert [e.key for e in validate(s)] == ["2nd pass.network_rank"]


# -- docs and CLI


def test_settings_markdown_lists_every_key():
    md = settings_markdown()
    for f in FIELDS:
        assert f"`{f.key}`" in md
    assert SEPARATOR not in md and md.count("\n") == len(FIELDS) + 2


def test_parse_set_args():
    layer = parse_set_args(["network_rank=8", "image_size(height, width)=768,512", "train_seed = 3",
                            "2nd pass.train_iterations=200", "pass2.use_2nd_pass_settings=true", "original_prompt=a=b"])
    assert layer == {"network_rank": "8", SIZE: "768,512", "train_seed": " 3", "original prompt": "a=b",
                     "2nd pass": {"train_iterations": "200", "use_2nd_pass_settings": "true"}}
    s = Settings.from_layers({"mode": "Difference"}, layer)
    assert s.for_pass(2).train_iterations == 200 and s.image_size == (768, 512)


def test_parse_set_args_unknown_key_lists_close_matches():
    with pytest.raises(SettingsError, match="network_rank"):
        parse_set_args(["network_rnk=8"])
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        parse_set_args(["network_rank"])


# -- property tests

_VALUES = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([f.key for f in FIELDS]), _VALUES, max_size=12))
def test_from_json_dict_only_raises_settings_error(d):
    try:
        s, _ = Settings.from_json_dict(d)
    except SettingsError:
        return
    assert Settings.from_json_dict(s.to_json_dict())[0].to_json_dict() == s.to_json_dict()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_kwargs_only_raises_settings_error(text):
    try:
        result = parse_kwargs(text, "train_optimizer_settings")
    except SettingsError:
        return
    assert all(k.isidentifier() for k in result)



# Settings shown but read by no code, each with the reason it stays in the table.
UNREAD_BY_DESIGN = {
    # the reference product's own dead option (§17 #44): kept so reference presets and the reference's
    # export layout stay key-for-key; its help says "No effect" and points to BASE in network blocks
    "network_train_text_encoder",
}


def _unread_settings(fields) -> list[str]:
    """Keys that no module of ``trainer/`` reads: neither ``.<attr>`` nor the key (or attr) as a string.

    ``settings.py`` counts for attribute reads only: its tables name every key as a string.
    """
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "trainer"
    texts = {"table": [], "code": []}
    for path in root.rglob("*.py"):
        texts["table" if path == root / "settings.py" else "code"].append(path.read_text(encoding="utf-8"))
    code, table = "\n".join(texts["code"]), "\n".join(texts["table"])
    unread = []
    for f in fields:
        attr = re.compile(r"\." + re.escape(f.attr) + r"\b")
        names = {f.key, f.attr}
        quoted = re.compile("|".join(r"[\"']" + re.escape(n) + r"[\"']" for n in names))
        if not (attr.search(code) or quoted.search(code) or attr.search(table)):
            unread.append(f.key)
    return unread


def test_every_setting_in_the_table_is_read_by_the_code():
    """A setting that is shown, saved and documented but changes nothing is a lie to the user."""
    assert _unread_settings(FIELDS) == sorted(UNREAD_BY_DESIGN)


def test_the_unread_scan_finds_a_new_dead_setting():
    from trainer.settings import Field

    dead = Field(key="zz_new_dead_setting", type=bool, default=False, help="x")
    assert _unread_settings([dead, FIELD_BY_KEY["train_VAE_precision"], FIELD_BY_KEY["logging_verbose"]]) == [
        "zz_new_dead_setting"]
