"""Jobs, the persistent queue and the one worker thread (design decision 5, R21).

A job is a value: its settings (reference JSON layout) and copies of the images it needs live in the
queue file and the job's own folder, so the queue survives a restart and a failing job never blocks
the next one.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import SettingsError, TrainTrainError, ValidationError
from trainer.paths import atomic_write_text, inside
from trainer.progress import CallbackSink, Events, HistorySink, Message, ProgressEvent

QUEUED, RUNNING, DONE, FAILED, STOPPED, INTERRUPTED, CANCELLED = (
    "queued", "running", "done", "failed", "stopped", "interrupted", "cancelled",
)
ACTIVE = (QUEUED, RUNNING)
IMAGE_KEYS = ("original image", "target image")


@dataclass
class JobRecord:
    """One queue entry and, once run, its outcome."""

    job_id: str
    name: str
    mode: str
    settings: dict[str, Any]
    status: str = QUEUED
    message: str = ""
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> JobRecord:
        known = {k: data[k] for k in JobRecord.__dataclass_fields__ if k in data}
        return JobRecord(**known)


@dataclass(frozen=True)
class Progress:
    """What the UI shows about the running job."""

    job_id: str
    name: str
    step: int
    total: int
    loss: float | None
    loss_ema: float | None
    lrs: dict[str, float]
    epoch: int
    elapsed_s: float
    eta_s: float
    pass_index: int
    text: str = ""
    epochs: int = 0


class JobQueue:
    """An ordered list of records persisted as JSON after every change (atomic rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[JobRecord] = []
        if path.exists():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                self.records = [JobRecord.from_dict(r) for r in raw.get("jobs", [])]
            except (OSError, ValueError, TypeError) as err:
                backup = path.with_suffix(".corrupt.json")
                shutil.copyfile(path, backup)
                print(f"[TrainTrain] queue file {path} is unreadable ({err}); kept a copy at {backup} and started empty")
        for record in self.records:
            if record.status == RUNNING:  # the process died while it ran
                record.status = INTERRUPTED
                record.message = "interrupted (the process ended while it ran); set train_resume_state to continue"
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"version": 1, "jobs": [r.to_dict() for r in self.records]}, indent=1))

    def find(self, job_id: str) -> JobRecord:
        for record in self.records:
            if record.job_id == job_id:
                return record
        raise KeyError(job_id)


Runner = Callable[..., dict[str, Any]]


class Worker:
    """Owns the queue, runs one job at a time on a background thread, and answers the UI.

    Args:
        host: where models come from and LoRAs go.
        state_dir: holds ``queue.json`` and ``jobs/<id>/`` (copies of the images a job needs).
        logs_root: CSV loss logs folder; json_root: settings snapshots folder.
        runner: the function that trains one job (``trainer.runner.run_job``), injectable for tests.
    """

    def __init__(
        self,
        host,
        state_dir: Path,
        *,
        logs_root: Path | None = None,
        json_root: Path | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.host = host
        self.state_dir = Path(state_dir)
        self.logs_root = logs_root
        self.json_root = json_root
        self.queue = JobQueue(self.state_dir / "queue.json")
        if runner is None:
            from trainer.runner import run_job as runner
        self.runner = runner
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop_request: str | None = None
        self._history = HistorySink()
        self._current: str | None = None
        self._last: str | None = None  # the job the history belongs to, kept after it ends

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, settings, *, start: bool) -> JobRecord:
        """Validate and queue a job; with ``start`` run the queue now if the worker is idle.

        Raises:
            ValidationError: every settings problem at once (the job is not queued).
            SettingsError: the output name is already queued or running.
        """
        from trainer.settings import validate

        problems = validate(settings)
        if problems:
            raise ValidationError(problems)
        with self._lock:
            name = settings.save_lora_name
            for other in self.queue.records:
                if other.status in ACTIVE and other.name == name:
                    raise SettingsError("save_lora_name", f"'{name}' is already {other.status}; choose another name")
            job_id = time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
            raw = self._copy_inputs(job_id, settings.to_json_dict(), settings)
            record = JobRecord(job_id, name, settings.mode, raw)
            if start and not self.is_busy():
                queued = [i for i, r in enumerate(self.queue.records) if r.status == QUEUED]
                self.queue.records.insert(queued[0] if queued else len(self.queue.records), record)
            else:
                self.queue.records.append(record)
            self.queue.save()
            if start:
                self._ensure_running()
        return record

    def _copy_inputs(self, job_id: str, raw: dict[str, Any], settings) -> dict[str, Any]:
        """Copy the images a job needs into its own folder so the queued job is self-contained."""
        folder = inside(self.state_dir, "jobs", job_id)
        for key in IMAGE_KEYS:
            attr = key.replace(" ", "_")
            source = getattr(settings, attr, "") or ""
            if not source:
                continue
            src = Path(source)
            if not src.is_file():
                raise SettingsError(attr, f"file '{source}' does not exist; choose an image file")
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / f"{attr}{src.suffix.lower() or '.png'}"
            shutil.copyfile(src, dst)
            raw[key] = str(dst)
        return raw

    # -- controls -------------------------------------------------------------------------------

    def run_queue(self) -> str:
        """Start working through queued jobs if idle."""
        with self._lock:
            if not any(r.status == QUEUED for r in self.queue.records):
                return "The queue is empty."
            self._ensure_running()
        return "Running the queue."

    def stop(self, save: bool = False) -> str:
        """Stop (or stop and save) the running job; the next queued job then starts."""
        with self._lock:
            if self._current is None:
                return "Nothing is training."
            self._stop_request = "save" if save else "stop"
            return "Stopping and saving…" if save else "Stopping…"

    def stop_all(self) -> str:
        """Stop the running job and cancel every queued one."""
        with self._lock:
            cancelled = 0
            for record in self.queue.records:
                if record.status == QUEUED:
                    record.status, record.message = CANCELLED, "cancelled by Stop all"
                    cancelled += 1
            self.queue.save()
            running = self._current is not None
            if running:
                self._stop_request = "stop"
        return f"Stopping the running job and cancelled {cancelled} queued." if running else f"Cancelled {cancelled} queued."

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running (and its folder)."""
        with self._lock:
            record = self.queue.find(job_id)
            if record.status == RUNNING:
                raise SettingsError("queue", f"'{record.name}' is running; stop it first")
            self.queue.records.remove(record)
            self.queue.save()
            shutil.rmtree(self.state_dir / "jobs" / job_id, ignore_errors=True)

    def move(self, job_id: str, delta: int) -> None:
        """Move a job up (negative) or down (positive) in the queue."""
        with self._lock:
            records = self.queue.records
            record = self.queue.find(job_id)
            i = records.index(record)
            j = min(max(i + delta, 0), len(records) - 1)
            records.insert(j, records.pop(i))
            self.queue.save()

    # -- queries --------------------------------------------------------------------------------

    def records(self) -> list[JobRecord]:
        with self._lock:
            return list(self.queue.records)

    def is_busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def progress(self) -> Progress | None:
        """The running job's latest step, or the last job's final one once it ended."""
        with self._lock:
            event, job_id = self._history.latest, self._current or self._last
            if event is None or job_id is None:
                return None
            record = self.queue.find(job_id)
        text = self._history.messages[-1].text if self._history.messages else ""
        return Progress(job_id, record.name, event.step, event.total, event.loss, event.loss_ema, dict(event.lrs),
                        event.epoch, event.elapsed_s, event.eta_s, event.pass_index, text, event.epochs)

    def history(self) -> list[dict[str, float]]:
        """Loss rows of the running (or last) job, for the live curve."""
        return list(self._history.rows)

    def previews(self) -> list:
        """Preview events (``PreviewEvent``) of the running (or last) job, newest first."""
        return list(reversed(self._history.previews))

    def messages(self) -> list[str]:
        return [f"{m.level}: {m.text}" if m.level != "info" else m.text for m in self._history.messages]

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Block until the queue is drained (tests, CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return True
            thread.join(0.05)
        return False

    # -- the worker thread ----------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if not self.is_busy():
            self._thread = threading.Thread(target=self._drain, name="traintrain-worker", daemon=True)
            self._thread.start()

    def _next(self) -> JobRecord | None:
        with self._lock:
            for record in self.queue.records:
                if record.status == QUEUED:
                    record.status, record.started, record.message = RUNNING, time.time(), "running"
                    self._current, self._last, self._stop_request = record.job_id, record.job_id, None
                    self._history = HistorySink()
                    self.queue.save()
                    return record
            self._current = None
            return None

    def _drain(self) -> None:
        while (record := self._next()) is not None:
            status, message, result = self._run_one(record)
            with self._lock:
                record.status, record.message, record.result = status, message, result
                record.finished = time.time()
                self._current = None
                self.queue.save()
            _release_memory()

    def _check_stop(self) -> str | None:
        if self._stop_request:
            return self._stop_request
        interrupted = getattr(self.host, "interrupted", None)
        return "stop" if interrupted and interrupted() else None

    def _run_one(self, record: JobRecord) -> tuple[str, str, dict[str, Any] | None]:
        from trainer.settings import Settings

        events = Events([self._history, CallbackSink(self._mirror_to_host)])
        try:
            settings, _ = Settings.from_json_dict(record.settings)
            result = self.runner(settings, self.host, events=events, stop=self._check_stop,
                                 logs_root=self.logs_root, json_root=self.json_root)
        except TrainTrainError as err:
            events.emit(Message("error", str(err)))
            return FAILED, f"Error: {err}", None
        except Exception as err:  # noqa: BLE001 - a failing job must never take the queue down
            traceback.print_exc()
            return FAILED, f"Error: {type(err).__name__}: {err} (details in the console)", None
        finally:
            events.close()
        status = {"done": DONE, "stopped": STOPPED, "saved_stop": STOPPED, "failed": FAILED}.get(result.get("status", ""), DONE)
        return status, result.get("message", status), result

    def _mirror_to_host(self, event) -> None:
        report = getattr(self.host, "report", None)
        if report is not None and isinstance(event, ProgressEvent):
            loss = f"{event.loss_ema:.4f}" if event.loss_ema is not None else "-"
            report(event.step, event.total, f"TrainTrain step {event.step}/{event.total}, loss {loss}")


def _release_memory() -> None:
    """Between jobs only (never per step, R19): give cached device memory back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
