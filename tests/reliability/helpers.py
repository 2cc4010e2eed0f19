"""Helpers shared by the reliability tests: tiny settings, running a job, and the two assertions every
catalogue case makes (one clear line, no partial file)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image

from trainer.progress import Events, HistorySink
from trainer.settings import Settings

# The smallest real run: tiny-sd1, 64 px, one bucket step, 2 steps of batch 1, fp32 on the CPU.
TINY: dict[str, Any] = {
    "mode": "LoRA", "model": "tiny-sd1", "image_size(height, width)": "64", "image_buckets_step": 32,
    "image_min_length": 32, "train_iterations": 2, "train_batch_size": 1, "train_model_precision": "fp32",
    "save_precision": "fp32", "network_rank": 4, "network_alpha": 4, "train_learning_rate": "1e-3",
    "train_seed": 0, "logging_save_csv": False, "effect_check": False, "save_sidecar_json": False,
}


def tiny(extra: dict[str, Any] | None = None, **overrides: Any) -> Settings:
    """Tiny settings plus ``extra`` (by exact key) and ``overrides`` (by attribute name)."""
    return Settings.from_layers(TINY, extra or {}, overrides)


def run(settings: Settings, host, **kw: Any) -> tuple[dict[str, Any], HistorySink]:
    """Run one job through the real runner; return the result and the messages it emitted."""
    from trainer.runner import run_job

    history = HistorySink()
    events = Events([history])
    try:
        return run_job(settings, host, events=events, **kw), history
    finally:
        events.close()


def texts(history: HistorySink) -> list[str]:
    return [m.text for m in history.messages]


def assert_clear(message: str, field: str, fix: str) -> None:
    """One line, naming the field/path and saying what to do; no traceback, no repr of an exception class."""
    message = message.strip()
    assert "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message and "File \"" not in message, message
    assert field in message, f"{field!r} not named in {message!r}"
    assert fix.lower() in message.lower(), f"fix {fix!r} not in {message!r}"


def assert_no_partial(folder: Path) -> None:
    """No temp file and no unreadable safetensors left in ``folder``."""
    from safetensors import safe_open

    if not folder.exists():
        return
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or re.match(r"^\..*\.tmp$", p.name)]
    assert not leftovers, leftovers
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:  # a half-written file fails to open
            assert list(handle.keys())


def write_image(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB", color: Any = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path
