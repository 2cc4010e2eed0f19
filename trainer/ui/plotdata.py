"""Loss/LR curves for the Plot tab and the live panel: CSV logs under ``logs/`` and the worker's history.

Curves are long-format pandas frames (``step``, ``value``, ``series``) because that is what
``gr.LinePlot`` draws the same way on gradio 3.41 through 6. Only files inside ``logs_root`` are opened
(the reference plotted the newest CSV anywhere under the Web-UI, §17 #42).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trainer.csvlog import list_logs, read_log
from trainer.errors import InputError
from trainer.paths import inside

COLUMNS = ("step", "value", "series")


def log_choices(logs_root: str | os.PathLike[str]) -> list[str]:
    """CSV logs as paths relative to ``logs_root`` (``20250101/name-20250101_120000.csv``), newest first."""
    root = Path(logs_root)
    return [p.relative_to(root).as_posix() for p in list_logs(root)]


def resolve_log(logs_root: str | os.PathLike[str], name: str) -> Path:
    """The CSV file ``name`` (relative, as listed) inside ``logs_root``.

    Raises:
        SettingsError: the name leads outside ``logs_root``.
        InputError: not a CSV file, or it does not exist.
    """
    path = inside(logs_root, *Path(name).parts)
    if path.suffix.lower() != ".csv":
        raise InputError(name, "is not a .csv log; pick one from the list")
    if not path.is_file():
        raise InputError(name, "no such log file; press 🔄 to refresh the list")
    return path


def _frame(rows: list[tuple[float, float, str]]):
    import pandas as pd

    # Explicit dtypes: an empty frame must still tell the plot that step/value are numbers.
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"step": "float64", "value": "float64", "series": "object"})


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def frames_from_columns(columns: list[str], rows: Iterable[list[float]]):
    """(loss frame, LR frame) from CSV columns ``Step,Loss[,Loss EMA],Learning Rate <group>...``.

    Reference logs (``Step,Loss,Learning Rate 1``) work too; their ``Loss`` is already the EMA.
    """
    loss_rows: list[tuple[float, float, str]] = []
    lr_rows: list[tuple[float, float, str]] = []
    lr_names = {i: c.replace("Learning Rate", "LR").strip() for i, c in enumerate(columns) if c.startswith("Learning Rate")}
    loss_cols = {i: c for i, c in enumerate(columns) if c in ("Loss", "Loss EMA")}
    for row in rows:
        if not row or not _finite(row[0]):
            continue
        step = row[0]
        for i, name in loss_cols.items():
            if i < len(row) and _finite(row[i]):
                loss_rows.append((step, row[i], name))
        for i, name in lr_names.items():
            if i < len(row) and _finite(row[i]):
                lr_rows.append((step, row[i], name))
    return _frame(loss_rows), _frame(lr_rows)


def frames_from_log(path: str | os.PathLike[str]):
    """(header dict, loss frame, LR frame) of a CSV log (a file still being written reads fine)."""
    header, columns, rows = read_log(path)
    loss, lr = frames_from_columns(columns, rows)
    return header, loss, lr


def frames_from_history(history: Iterable[Mapping[str, float]]):
    """(loss frame, LR frame) from the worker's live rows ``{step, loss, loss_ema, lr_<group>...}``."""
    loss_rows: list[tuple[float, float, str]] = []
    lr_rows: list[tuple[float, float, str]] = []
    for row in history:
        step = row.get("step")
        if not _finite(step):
            continue
        for key, name in (("loss", "Loss"), ("loss_ema", "Loss EMA")):
            if _finite(row.get(key)):
                loss_rows.append((step, row[key], name))
        for key, value in row.items():
            if key.startswith("lr_") and _finite(value):
                lr_rows.append((step, value, f"LR {key[3:]}"))
    return _frame(loss_rows), _frame(lr_rows)
