"""Text and tables the tab shows: the live progress panel, result lines and the queue table (pure)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

ACTIVE = ("queued", "running")
QUEUE_HEADERS = ("#", "id", "name", "mode", "status", "result")


def format_seconds(seconds: float | None) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``; unknown -> ``–``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.4g}"


def _cell(label: str, value: str) -> str:
    return f'<div class="tt-stat"><span class="tt-stat-label">{label}</span><span class="tt-stat-value">{value}</span></div>'


def _epoch(progress: Any) -> str:
    """``3 / 10`` for dataset runs, ``–`` for modes without a dataset."""
    total = getattr(progress, "epochs", 0)
    if not progress.epoch:
        return "–"
    return f"{progress.epoch} / {total}" if total else str(progress.epoch)


def unet_lr(lrs: dict[str, float]) -> float | None:
    """The U-Net learning rate of a step's ``{group: lr}`` (the text encoder's has its own field)."""
    if not lrs:
        return None
    for name, value in lrs.items():
        if "unet" in str(name).lower():
            return value
    return next(iter(lrs.values()))


def progress_html(progress: Any, busy: bool, queued: int, note: str = "") -> str:
    """The live panel: a bar with step/total and cells for loss, EMA, LR, epoch, elapsed and ETA.

    Args:
        progress: the worker's latest ``Progress`` (None before the first step).
        busy: a job is running (loading the model counts).
        queued: jobs waiting.
        note: the latest worker message (model loading, data summary, ...).
    """
    waiting = f" · {queued} queued" if queued else ""
    if progress is None:
        state = "Preparing…" if busy else "Idle"
        extra = f'<div class="tt-note">{html.escape(note)}</div>' if note and busy else ""
        return f'<div class="tt-progress tt-idle"><div class="tt-progress-title">{state}{waiting}</div>{extra}</div>'
    total = max(int(progress.total or 0), 1)
    pct = min(100.0, 100.0 * progress.step / total)
    passes = f" · pass {progress.pass_index}" if getattr(progress, "pass_index", 1) > 1 else ""
    lrs = _num(unet_lr(progress.lrs or {}))
    cells = "".join((
        _cell("loss", _num(progress.loss)), _cell("loss EMA", _num(progress.loss_ema)), _cell("U-Net LR", lrs),
        _cell("epoch", _epoch(progress)), _cell("elapsed", format_seconds(progress.elapsed_s)),
        _cell("ETA", format_seconds(progress.eta_s)),
    ))
    title = html.escape(progress.name)
    state = "Training" if busy else "Finished"
    note_html = f'<div class="tt-note">{html.escape(note)}</div>' if note else ""
    return (
        f'<div class="tt-progress"><div class="tt-progress-title">{state} <b>{title}</b>{passes}{waiting}</div>'
        f'<div class="tt-bar"><div class="tt-bar-fill" style="width:{pct:.1f}%"></div>'
        f'<span class="tt-bar-text" id="tt_step_text">step {progress.step} / {progress.total}</span></div>'
        f'<div class="tt-stats">{cells}</div>{note_html}</div>'
    )


def finished_html(record: Any, last_row: dict[str, float], queued: int = 0) -> str:
    """The panel after a run: outcome, steps, final loss/EMA, time, the file written and the report card."""
    from trainer.ui.report_card import card_html

    result = record.result or {}
    steps = result.get("steps")
    done = record.status == "done"
    state = {"done": "Done", "stopped": "Stopped", "failed": "Failed", "cancelled": "Cancelled"}.get(
        record.status, record.status.capitalize())
    waiting = f" · {queued} queued" if queued else ""
    bar = ""
    if isinstance(steps, int):
        text = f"step {steps} / {steps}" if done else f"step {steps}"
        bar = (f'<div class="tt-bar"><div class="tt-bar-fill" style="width:{100 if done else 0}%"></div>'
               f'<span class="tt-bar-text" id="tt_step_text">{text}</span></div>')
    cells = "".join((
        _cell("loss", _num(last_row.get("loss"))), _cell("loss EMA", _num(last_row.get("loss_ema"))),
        _cell("time", format_seconds(result.get("seconds"))),
    ))
    path = result.get("lora_path")
    file_html = f'<div class="tt-note">{html.escape(str(path))}</div>' if path else ""
    error = "" if result else f'<div class="tt-note">{html.escape(record.message or "")}</div>'
    return (f'<div class="tt-progress tt-finished tt-{html.escape(record.status)}"><div class="tt-progress-title">'
            f'{state} <b>{html.escape(record.name)}</b>{waiting}</div>{bar}<div class="tt-stats">{cells}</div>'
            f'{file_html}{error}{card_html(result.get("report"))}</div>')


def result_line(record: Any) -> str:
    """What the Message box says about a finished job: name, outcome, and the file it wrote."""
    message = (record.message or record.status).strip()
    return f"{record.name}: {message}"


def latest_finished(records: Sequence[Any]) -> Any | None:
    """The most recently finished record (done, failed, stopped, cancelled), or None."""
    finished = [r for r in records if r.status not in ACTIVE and getattr(r, "finished", None)]
    return max(finished, key=lambda r: r.finished) if finished else None


def queue_status(records: Sequence[Any]) -> str:
    """The Queue tab's status line, kept current by the poll (a button's reply must not linger)."""
    running = next((r for r in records if r.status == "running"), None)
    queued = sum(1 for r in records if r.status == "queued")
    if running is not None:
        waiting = f"{queued} more waiting" if queued else "nothing else waiting"
        return f"Running '{running.name}'; {waiting}."
    if queued:
        return f"{queued} job(s) waiting. Press ▶ Run queue to start them."
    last = latest_finished(records)
    if last is not None:
        return f"Queue finished. Last job: '{last.name}' ({last.status})."
    return "The queue is empty. Add jobs with Add to Queue on the Train tab."


def queue_rows(records: Iterable[Any]) -> list[list[Any]]:
    """Rows for the Queue table, in queue order."""
    rows = []
    for i, r in enumerate(records, 1):
        message = (r.message or "").splitlines()[0] if r.message else ""
        rows.append([i, r.job_id, r.name, r.mode, r.status, message[:160]])
    return rows


def job_choice(record: Any) -> str:
    """A Queue-tab dropdown entry: ``<id> · <name> (<status>)``; the id is the first word."""
    return f"{record.job_id} · {record.name} ({record.status})"


def job_id_of(choice: str | None) -> str:
    """The job id from a dropdown entry (or a bare id typed by hand)."""
    return (choice or "").strip().split(" ", 1)[0]


def preview_caption(event: Any) -> str:
    """``step 40 · LoRA −1 / 0 / +1 · a cat`` for a gallery tile."""
    weights = " / ".join(f"{m:+g}" if m else "0" for m in event.multipliers)
    passes = " · pass 2" if event.pass_index > 1 else ""
    return f"step {event.step}{passes} · LoRA {weights} · {event.prompt}"[:120]
