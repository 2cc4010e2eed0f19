"""One progress event stream, many views (R18): the loop emits events; sinks render them.

The loop never formats text for a view. ``TqdmSink`` draws the CLI bar, ``CsvSink`` (csvlog.py)
writes rows, the UI keeps the latest event and the loss history, and the Web-UI host mirrors the step
into ``shared.state``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ProgressEvent:
    """One optimizer step.

    Attributes:
        step: steps done in this pass (1-based).
        total: steps in this pass.
        loss: raw loss of this step (None on steps where it was not synced from the device).
        loss_ema: exponential moving average of the loss (0.9 decay).
        lrs: learning rate per parameter group name.
        epoch: the dataset epoch of this step, 1-based (0 when the mode has no dataset).
        elapsed_s: seconds since the pass started.
        eta_s: estimated seconds to the end of the pass.
        pass_index: 1, or 2 for Difference pass 2.
        epochs: epochs the pass covers (0 when the mode has no dataset).
    """

    step: int
    total: int
    loss: float | None
    loss_ema: float | None
    lrs: dict[str, float]
    epoch: int = 0
    elapsed_s: float = 0.0
    eta_s: float = 0.0
    pass_index: int = 1
    epochs: int = 0


@dataclass(frozen=True)
class Message:
    """A line for the user: ``level`` is ``info``, ``warning`` or ``error``."""

    level: str
    text: str


@dataclass(frozen=True)
class RunSummary:
    """The start-of-run banner, as data (R18): what is about to be trained."""

    mode: str
    pass_index: int
    total_steps: int
    batch_size: int
    num_images: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    trainable_params: dict[str, int] = field(default_factory=dict)
    network: str = ""
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreviewEvent:
    """A preview image was written (``sample_every_n_steps``).

    Attributes:
        path: the PNG (a strip, left to right, for several multipliers).
        step: the step it shows; pass_index: 1, or 2 for Difference pass 2.
        prompt: the prompt rendered.
        multipliers: the LoRA weights, left to right.
        seconds_per_image: rendering time per image of the strip.
    """

    path: str
    step: int
    pass_index: int
    prompt: str
    multipliers: tuple[float, ...] = (1.0,)
    seconds_per_image: float = 0.0


Event = ProgressEvent | Message | RunSummary | PreviewEvent


class Sink(Protocol):
    """Anything that consumes events."""

    def on_event(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Events:
    """Fan-out of events to sinks; a failing sink is reported once and then muted, never kills a run."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])
        self._broken: set[int] = set()

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        for i, sink in enumerate(self.sinks):
            if i in self._broken:
                continue
            try:
                sink.on_event(event)
            except Exception as err:  # noqa: BLE001 - a view must never stop training
                self._broken.add(i)
                print(f"[TrainTrain] progress view {type(sink).__name__} failed and is muted: {err}", file=sys.stderr)

    def info(self, text: str) -> None:
        self.emit(Message("info", text))

    def warning(self, text: str) -> None:
        self.emit(Message("warning", text))

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001
                print(f"[TrainTrain] closing {type(sink).__name__} failed: {err}", file=sys.stderr)


class LossTracker:
    """EMA of the loss and an ETA from a smoothed step time."""

    def __init__(self, total: int, decay: float = 0.9) -> None:
        self.total = total
        self.decay = decay
        self.ema: float | None = None
        self.start = time.perf_counter()

    def update(self, loss: float | None) -> float | None:
        if loss is not None and loss == loss:  # NaN never enters the EMA
            self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
        return self.ema

    def timing(self, step: int) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step, 1) * max(self.total - step, 0)
        return elapsed, eta


class TqdmSink:
    """The CLI progress bar: step/total, loss EMA, learning rate, epoch, ETA."""

    def __init__(self, file=None, disable: bool = False) -> None:
        self.file = file or sys.stderr
        self.disable = disable
        self._bar = None

    def on_event(self, event: Event) -> None:
        if self.disable:
            return
        from tqdm import tqdm

        if isinstance(event, RunSummary):
            self.close()
            desc = event.mode if event.pass_index == 1 else f"{event.mode} pass 2"
            self._bar = tqdm(total=event.total_steps, desc=desc, file=self.file, dynamic_ncols=True)
        elif isinstance(event, ProgressEvent) and self._bar is not None:
            self._bar.n = event.step
            lr = next(iter(event.lrs.values()), 0.0)
            post = {"loss": f"{event.loss_ema:.4f}" if event.loss_ema is not None else "-", "lr": f"{lr:.2e}"}
            if event.epoch:
                post["epoch"] = f"{event.epoch}/{event.epochs}" if event.epochs else event.epoch
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
            if event.step >= event.total:
                self.close()  # finished: later lines (saving, effect) must not redraw the bar under them
        elif isinstance(event, PreviewEvent):
            writer = self._bar.write if self._bar is not None else (lambda s: print(s, file=self.file))
            writer(f"preview (step {event.step}, {event.seconds_per_image:.1f} s/image): {event.path}")
        elif isinstance(event, Message):
            writer = self._bar.write if self._bar is not None else (lambda s: print(s, file=self.file))
            writer(f"[{event.level}] {event.text}" if event.level != "info" else event.text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class HistorySink:
    """Keeps the latest event and the loss history in memory, for the UI's live panel and plot."""

    def __init__(self, max_rows: int = 20000) -> None:
        self.latest: ProgressEvent | None = None
        self.summary: RunSummary | None = None
        self.rows: list[dict[str, float]] = []
        self.messages: list[Message] = []
        self.previews: list[PreviewEvent] = []
        self.max_rows = max_rows

    def on_event(self, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            self.latest = event
            if event.loss is not None and len(self.rows) < self.max_rows:
                row = {"step": float(event.step), "pass": float(event.pass_index), "loss": event.loss}
                row["loss_ema"] = event.loss_ema if event.loss_ema is not None else event.loss
                row.update({f"lr_{k}": v for k, v in event.lrs.items()})
                self.rows.append(row)
        elif isinstance(event, RunSummary):
            self.summary = event
        elif isinstance(event, Message):
            self.messages.append(event)
        elif isinstance(event, PreviewEvent):
            self.previews.append(event)

    def close(self) -> None:
        pass


class CallbackSink:
    """Calls a function with each event (host progress mirrors, tests)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_event(self, event: Event) -> None:
        self.fn(event)

    def close(self) -> None:
        pass
