"""The tab built from FIELDS: one widget per field with unique ids, and its handlers (no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

from trainer.errors import SettingsError, ValidationError  # noqa: E402
from trainer.presets import load_preset  # noqa: E402
from trainer.settings import FIELDS, Settings  # noqa: E402
from trainer.ui import form  # noqa: E402
from trainer.ui.tab import TrainTab  # noqa: E402

PRESETS = Path(__file__).resolve().parents[2] / "presets"


class FakeHost:
    name = "standalone"

    def list_models(self):
        return ["tiny-sd1", "tiny-sdxl"]

    def list_vaes(self):
        return [""]

    def list_text_encoders(self):
        return ["", "qwen_3_4b.safetensors"]

    def default_model(self):
        return "tiny-sd1"


class FakeWorker:
    """Records what the tab asks for; never trains."""

    def __init__(self, error: Exception | None = None):
        self.submitted: list[tuple[Settings, bool]] = []
        self.error = error
        self.preview_events: list = []

    def submit(self, settings, *, start):
        if self.error:
            raise self.error
        self.submitted.append((settings, start))
        return type("Rec", (), {"name": settings.save_lora_name, "mode": settings.mode, "status": "queued"})()

    def records(self):
        return []

    def is_busy(self):
        return False

    def progress(self):
        return None

    def history(self, job_id=None):
        return []

    def previews(self):
        return list(self.preview_events)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tab")
    (root / "presets").mkdir()
    for src in PRESETS.glob("*.json"):
        (root / "presets" / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    tab = TrainTab(FakeWorker(), FakeHost(), presets_dir=root / "presets", json_root=root / "json",
                   logs_root=root / "logs")
    demo = tab.build()
    return tab, demo, root


def _values(tab: TrainTab, settings: Settings) -> tuple:
    first, second, job = form.widget_values(settings)
    return (*(first[k] for k in tab.first), *(second[k] for k in tab.second), *(job[k] for k in tab.job))


def test_one_widget_per_field_with_its_id(built):
    tab, _, _ = built
    assert set(tab.first) == {f.key for f in form.pass1_fields()}
    assert set(tab.second) == {f.key for f in FIELDS if f.pass2}
    assert set(tab.job) == {f.key for f in form.job_fields()}
    for f in form.pass1_fields():
        assert tab.first[f.key].elem_id == f"tt_{f.attr}"
        assert tab.first[f.key].label == f.label
    for widget in tab.second.values():
        assert widget.elem_id.startswith("tt2_")


def test_element_ids_are_unique(built):
    _, demo, _ = built
    ids = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) == len(set(ids)) and len(ids) > 100


def test_start_zips_values_back_by_key(built):
    tab, _, _ = built
    settings, _ = load_preset("Difference_Use2ndPass", tab.presets_dir)
    tab.worker.submitted.clear()
    text = tab.on_submit(True, *_values(tab, settings))
    sent, start = tab.worker.submitted[-1]
    assert start is True and "Started" in text
    assert sent.raw == settings.raw and sent.for_pass(2).raw == settings.for_pass(2).raw


def test_problems_are_listed_one_per_line(built):
    tab, _, _ = built
    tab.worker.error = ValidationError([SettingsError("train_iterations", "must be > 0"),
                                        SettingsError("model", "is empty; pick a model")])
    try:
        text = tab.on_submit(True, *_values(tab, Settings.from_layers({})))
    finally:
        tab.worker.error = None
    assert text.splitlines() == ["train_iterations: must be > 0", "model: is empty; pick a model"]


def test_saving_a_preset_never_starts_training(built):
    tab, _, root = built
    tab.worker.submitted.clear()
    dropdown, text = tab.on_save_preset(*_values(tab, Settings.from_layers({"save_lora_name": "mine"})))
    assert tab.worker.submitted == []
    assert (root / "presets" / "mine.json").is_file() and "Preset saved" in text
    assert dropdown["value"] == "mine" and "mine" in dropdown["choices"]


def test_loading_a_preset_keeps_the_model_when_it_has_none(built):
    tab, _, _ = built
    out = tab.on_load_preset("LoRA", "tiny-sdxl")
    outputs = tab._load_outputs()
    model = out[outputs.index(tab.job["model"])]
    assert "value" not in model  # no change
    blocks = out[outputs.index(tab.first[form.BLOCKS_KEY])]
    assert blocks["choices"] == form.blocks_for("sdxl", "lierla") and blocks["value"] == blocks["choices"]
    assert out[-1].startswith("Loaded preset 'LoRA'")
    mode = out[outputs.index(tab.job["mode"])]
    assert mode["value"] == "LoRA"


def test_copy_from_pass1_keeps_use_2nd_pass_settings(built):
    tab, _, _ = built
    first, _, _ = form.widget_values(Settings.from_layers({"network_type": "c3lier", "network_rank": "64"}))
    choices = form.blocks_for("sd", "c3lier")
    first[form.BLOCKS_KEY] = choices
    out = tab.on_copy(choices, *(first[k] for k in tab.first), choices)
    by_key = dict(zip(tab.second, out[:-1], strict=True))
    assert "value" not in by_key[form.USE_PASS2_KEY]
    assert by_key["network_type"]["value"] == "c3lier" and by_key["network_rank"]["value"] == "64"
    assert by_key[form.BLOCKS_KEY]["value"] == choices


def _defaults(tab: TrainTab) -> list:
    first, _, _ = form.widget_values(Settings.from_layers({}))
    return [first[k] for k in tab.first]


def test_mode_switch_updates_every_dependent_widget(built):
    tab, _, _ = built
    outputs = tab._mode_outputs()
    out = dict(zip(map(id, outputs), tab.on_mode("iLECO", "LoRA", *_defaults(tab)), strict=True))
    assert out[id(tab.ui["prompts"])]["visible"] is True
    assert out[id(tab.ui["images"])]["visible"] is False and out[id(tab.ui["pass2"])]["visible"] is False
    assert out[id(tab.first["lora_data_directory"])]["visible"] is False
    assert out[id(tab.first["network_rank"])]["visible"] is True
    assert out[id(tab.ui["group_dataset"])]["visible"] is False  # iLECO has no dataset: the group goes
    assert out[id(tab.ui["mode_now"])] == "iLECO"


def test_mode_switch_applies_the_modes_defaults_only_where_nothing_was_typed(built):
    tab, _, _ = built
    outputs = tab._mode_outputs()
    values = _defaults(tab)
    values[list(tab.first).index("train_learning_rate")] = "3e-4"  # typed by the user
    out = dict(zip(map(id, outputs), tab.on_mode("iLECO", "LoRA", *values), strict=True))
    assert out[id(tab.first["network_rank"])]["value"] == "4"
    assert out[id(tab.first["train_iterations"])]["value"] == "500"
    assert "value" not in out[id(tab.first["train_learning_rate"])]
    assert "value" not in out[id(tab.first["train_batch_size"])]  # iLECO keeps the table's 2
    # the same mode again (a preset load sets mode_now first): nothing is overwritten
    same = dict(zip(map(id, outputs), tab.on_mode("iLECO", "iLECO", *values), strict=True))
    assert all("value" not in same[id(w)] for w in tab.first.values())
    # and the Network group title names what now differs from iLECO's defaults
    back = dict(zip(map(id, outputs), tab.on_mode("LoRA", "iLECO", *values), strict=True))
    assert back[id(tab.ui["group_network"])]["label"] == "Network · defaults"


def test_first_screen_layout_promises(built):
    tab, demo, _ = built
    assert tab.ui["preset"].value in (None, "", [])  # no preset name while the form holds defaults
    for group in ("dataset", "network", "optimizer", "noise", "saving", "previews", "advanced"):
        accordion = tab.ui[f"group_{group}"]
        assert accordion.open is False and accordion.label.endswith("· defaults"), group
    assert tab.first["train_learning_rate"].label == "Learning rate"
    assert "[train_learning_rate]" in tab.first["train_learning_rate"].info


def test_count_steps_shows_epochs_repeats_and_batches_before_a_run(built, tmp_path):
    from PIL import Image

    tab, _, _ = built
    folder = tmp_path / "data" / "3_cat"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 90, 90)).save(folder / f"c{i}.png")
    layers = {"lora_data_directory": str(tmp_path / "data"), "image_size(height, width)": "64",
              "image_buckets_step": 32, "image_min_length": 32, "train_batch_size": 2}
    by_epochs = tab.on_count_steps(*_values(tab, Settings.from_layers(layers, {"train_epochs": 10})))
    assert by_epochs == "60 steps = 10 epochs × 6 batches (4 images × 3 repeats / batch 2)"
    by_steps = tab.on_count_steps(*_values(tab, Settings.from_layers(layers, {"train_iterations": 15})))
    assert by_steps == "15 steps = 2.50 epochs × 6 batches (4 images × 3 repeats / batch 2)"
    missing = tab.on_count_steps(*_values(tab, Settings.from_layers({"lora_data_directory": str(tmp_path / "no")})))
    assert missing.startswith("cannot count steps:") and "does not exist" in missing


def _update_value(update):
    return update.get("value") if isinstance(update, dict) else getattr(update, "value", None)


def test_poll_shows_new_previews_newest_first_and_only_on_change(built, tmp_path):
    from PIL import Image

    from trainer.progress import PreviewEvent

    tab, _, _ = built
    events = []
    for step, color in ((10, (255, 0, 0)), (20, (0, 0, 255))):
        path = tmp_path / f"p_{step}.png"
        Image.new("RGB", (24, 8), color).save(path)
        events.append(PreviewEvent(str(path), step, 1, "a cat", (-1.0, 0.0, 1.0), 0.5))
    tab.worker.preview_events = events[::-1]  # the worker hands them newest first
    out = tab.poll({}, True)
    gallery, seen = out[GALLERY], out[-1]
    items = _update_value(gallery)
    assert gallery["visible"] is True
    assert [caption for _, caption in items] == ["step 20 · LoRA -1 / 0 / +1 · a cat", "step 10 · LoRA -1 / 0 / +1 · a cat"]
    assert items[0][0].getpixel((0, 0)) == (0, 0, 255)
    assert _update_value(tab.poll(seen, True)[GALLERY]) is None  # nothing new: the gallery is left alone
    tab.worker.preview_events = []
    cleared = tab.poll(seen, True)[GALLERY]
    assert _update_value(cleared) == [] and cleared["visible"] is False  # a new job: cleared, and out of the way


GALLERY, QUEUE_TEXT, LOGS = 7, 8, 9  # positions in poll()'s outputs


def test_poll_keeps_the_queue_line_and_the_plot_log_list_current(built, monkeypatch):
    from types import SimpleNamespace as R

    from trainer.csvlog import csv_path

    tab, _, _ = built
    records = [R(job_id="j1", name="a", mode="LoRA", status="running", message="", finished=None)]
    monkeypatch.setattr(tab.worker, "records", lambda: list(records))
    out = tab.poll({}, True)
    assert out[QUEUE_TEXT] == "Running 'a'; nothing else waiting."
    seen = out[-1]
    log = csv_path(tab.logs_root, "a", "20260101_120000")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("Step,Loss\n1,0.5\n", encoding="utf-8")
    records[0] = R(job_id="j1", name="a", mode="LoRA", status="done", message="ok", finished=5.0, result={})
    out = tab.poll(seen, True)
    assert out[QUEUE_TEXT] == "Queue finished. Last job: 'a' (done)."  # not "Running the queue." forever
    assert "20260101/a-20260101_120000.csv" in out[LOGS]["choices"]  # a log written after startup


def test_the_text_encoder_dropdown_lists_the_hosts_files(built):
    tab, _, _ = built
    te = tab.job["te"]
    assert te.elem_id == "tt_te" and te.value == form.NO_VAE
    assert [c[0] if isinstance(c, tuple) else c for c in te.choices] == [form.NO_VAE, "qwen_3_4b.safetensors"]
