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
