"""CSV log parsing for the Plot tab and the logs/ confinement."""

from __future__ import annotations

import pytest

from trainer.errors import InputError, SettingsError
from trainer.ui import plotdata

LOG = """network_rank,16
save_lora_name,demo
Step,Loss,Loss EMA,Learning Rate unet,Learning Rate te
1,0.5,0.5,1e-4,5e-5
2,0.3,0.48,9e-5,4.5e-5
3,0.2"""


def _write(root, rel, text=LOG):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_log_parses_from_the_step_header(tmp_path):
    path = _write(tmp_path, "20250101/demo-20250101_120000.csv")
    header, loss, lr = plotdata.frames_from_log(path)
    assert header == {"network_rank": "16", "save_lora_name": "demo"}
    assert loss.groupby("series")["value"].apply(list).to_dict() == {"Loss": [0.5, 0.3, 0.2], "Loss EMA": [0.5, 0.48]}
    assert sorted(set(lr["series"])) == ["LR te", "LR unet"]
    assert lr[lr.series == "LR unet"]["value"].tolist() == [1e-4, 9e-5]


def test_reference_log_without_ema_column(tmp_path):
    path = _write(tmp_path, "old.csv", "Step,Loss,Learning Rate 1\n1,0.9,0.001\n2,0.8,0.001\n")
    _, loss, lr = plotdata.frames_from_log(path)
    assert loss["value"].tolist() == [0.9, 0.8] and set(lr["series"]) == {"LR 1"}


def test_history_rows_become_frames():
    rows = [{"step": 1.0, "pass": 1.0, "loss": 0.4, "loss_ema": 0.4, "lr_unet": 1e-4},
            {"step": 2.0, "pass": 1.0, "loss": float("nan"), "loss_ema": 0.38, "lr_unet": 9e-5}]
    loss, lr = plotdata.frames_from_history(rows)
    assert len(loss) == 3 and lr["value"].tolist() == [1e-4, 9e-5]
    empty_loss, empty_lr = plotdata.frames_from_history([])
    assert list(empty_loss.columns) == list(plotdata.COLUMNS) and empty_lr.empty


def test_choices_are_relative_and_newest_first(tmp_path):
    import os

    old = _write(tmp_path, "20240101/a-20240101_000000.csv")
    new = _write(tmp_path, "20250101/b-20250101_000000.csv")
    os.utime(old, (1_000_000, 1_000_000))
    assert plotdata.log_choices(tmp_path) == ["20250101/b-20250101_000000.csv", "20240101/a-20240101_000000.csv"]
    assert plotdata.resolve_log(tmp_path, "20250101/b-20250101_000000.csv") == new.resolve()


def test_only_csv_files_inside_logs_can_be_opened(tmp_path):
    logs = tmp_path / "logs"
    _write(logs, "x.csv")
    outside = _write(tmp_path, "secret.csv")
    with pytest.raises(SettingsError):
        plotdata.resolve_log(logs, "../secret.csv")
    with pytest.raises(SettingsError):
        plotdata.resolve_log(logs, str(outside))
    (logs / "link.csv").symlink_to(outside)
    with pytest.raises(SettingsError):
        plotdata.resolve_log(logs, "link.csv")
    _write(logs, "notes.txt")
    with pytest.raises(InputError):
        plotdata.resolve_log(logs, "notes.txt")
    with pytest.raises(InputError):
        plotdata.resolve_log(logs, "missing.csv")
