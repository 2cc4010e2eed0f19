"""CSV loss log (reference §13.1 plus a raw-loss column) and its reader for the Plot tab.

Layout: a few ``key,value`` rows describing the run, then the column header
``Step,Loss,Loss EMA,Learning Rate <group>...`` and one row per optimizer step, flushed as written so
the Plot tab can follow a running job.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from trainer.progress import Event, ProgressEvent, RunSummary

HEADER_KEYS = (
    "network_rank",
    "network_alpha",
    "train_learning_rate",
    "train_iterations",
    "train_lr_scheduler",
    "model_version",
    "train_optimizer",
    "save_lora_name",
)


def csv_path(logs_root: str | os.PathLike[str], name: str, stamp: str, suffix: str = "") -> Path:
    """``logs/<YYYYMMDD>/<name>-<YYYYMMDD_HHMMSS><suffix>.csv`` (``suffix`` is ``_copy`` for pass 1)."""
    return Path(logs_root) / stamp[:8] / f"{name}-{stamp}{suffix}.csv"


def run_dir(logs_root: str | os.PathLike[str], name: str, stamp: str) -> Path:
    """``logs/<YYYYMMDD>/<name>-<YYYYMMDD_HHMMSS>``: the run's own folder, beside its CSV."""
    return Path(logs_root) / stamp[:8] / f"{name}-{stamp}"


def samples_dir(logs_root: str | os.PathLike[str], name: str, stamp: str) -> Path:
    """``<run_dir>/samples``: the run's preview images."""
    return run_dir(logs_root, name, stamp) / "samples"


def resume_dir(logs_root: str | os.PathLike[str], name: str, stamp: str) -> Path:
    """``<run_dir>/resume``: the run's resume states (never in the LoRA folder, where Web-UIs list every
    ``*.pt`` as a LoRA and refuse these as "may be malicious")."""
    return run_dir(logs_root, name, stamp) / "resume"


class CsvSink:
    """Writes one row per step for one pass; the header block comes from the run description."""

    def __init__(self, path: Path, header: dict[str, str], pass_index: int = 1) -> None:
        self.path = path
        self.header = header
        self.pass_index = pass_index
        self._file: io.TextIOWrapper | None = None
        self._writer = None
        self._groups: list[str] = []

    def _open(self, groups: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - lives for the run
        self._writer = csv.writer(self._file)
        for key in HEADER_KEYS:
            self._writer.writerow([key, self.header.get(key, "")])
        self._groups = groups
        self._writer.writerow(["Step", "Loss", "Loss EMA", *[f"Learning Rate {g}" for g in groups]])
        self._file.flush()

    def on_event(self, event: Event) -> None:
        if isinstance(event, RunSummary) or not isinstance(event, ProgressEvent):
            return
        if event.pass_index != self.pass_index:
            return
        if self._file is None:
            self._open(list(event.lrs))
        loss = "" if event.loss is None else f"{event.loss:.6g}"
        ema = "" if event.loss_ema is None else f"{event.loss_ema:.6g}"
        self._writer.writerow([event.step, loss, ema, *[f"{event.lrs.get(g, 0.0):.6g}" for g in self._groups]])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_log(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[str], list[list[float]]]:
    """Read a CSV log: (header block, column names, numeric rows). Works on a file still being written.

    Reference logs (``Step,Loss,Learning Rate 1``) read too: their ``Loss`` column is the EMA.
    """
    header: dict[str, str] = {}
    columns: list[str] = []
    rows: list[list[float]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for record in csv.reader(handle):
            if not record:
                continue
            if not columns:
                if record[0] == "Step":
                    columns = record
                elif len(record) >= 2:
                    header[record[0]] = record[1]
                continue
            try:
                rows.append([float(x) if x != "" else float("nan") for x in record])
            except ValueError:
                break  # a partially written last line
    return header, columns, rows


def list_logs(logs_root: str | os.PathLike[str]) -> list[Path]:
    """Every CSV under ``logs_root``, newest first."""
    root = Path(logs_root)
    if not root.is_dir():
        return []
    return sorted(root.rglob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True)
