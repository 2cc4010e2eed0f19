"""The live panel's epoch cell: ``k / N`` for dataset runs, a dash for modes without a dataset."""

from __future__ import annotations

from trainer.jobs import Progress
from trainer.ui.panels import progress_html


def _progress(epoch: int, epochs: int) -> Progress:
    return Progress("j1", "my_lora", 5, 12, 0.5, 0.5, {"unet": 1e-4}, epoch, 3.0, 4.0, 1, "", epochs)


def _epoch_cell(html: str) -> str:
    return html.split('tt-stat-label">epoch</span><span class="tt-stat-value">', 1)[1].split("<", 1)[0]


def test_epoch_cell_shows_the_current_of_all_epochs():
    assert _epoch_cell(progress_html(_progress(2, 3), True, 0)) == "2 / 3"
    assert _epoch_cell(progress_html(_progress(0, 0), True, 0)) == "–"  # iLECO, ADDifT: no dataset


def _cell(html: str, label: str) -> str:
    return html.split(f'tt-stat-label">{label}</span><span class="tt-stat-value">', 1)[1].split("<", 1)[0]


def test_lr_cell_shows_the_unet_rate_not_the_text_encoders():
    progress = Progress("j1", "my_lora", 5, 12, 0.5, 0.5, {"textencoder": 5e-5, "unet": 1e-4}, 0, 3.0, 4.0, 1, "", 0)
    assert _cell(progress_html(progress, True, 0), "U-Net LR") == "0.0001"


def test_queue_status_follows_the_queue_to_its_end():
    from types import SimpleNamespace as R

    from trainer.ui.panels import queue_status

    running = [R(name="a", status="running", finished=None), R(name="b", status="queued", finished=None)]
    assert queue_status(running) == "Running 'a'; 1 more waiting."
    waiting = [R(name="b", status="queued", finished=None)]
    assert "Press ▶ Run queue" in queue_status(waiting)
    done = [R(name="a", status="done", finished=2.0), R(name="b", status="failed", finished=3.0)]
    assert queue_status(done) == "Queue finished. Last job: 'b' (failed)."
