"""Fixtures of the browser tests: one standalone app per session (temp folders) and a Chromium page."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from trainer.csvlog import CsvSink, csv_path
from trainer.progress import LossTracker, Message, ProgressEvent, RunSummary


def make_dataset(folder: Path, count: int = 4, size: int = 64) -> Path:
    """A few seeded random PNGs (plus captions) to train on."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"sample{i}.png")
        (folder / f"sample{i}.txt").write_text(f"sample {i}", encoding="utf-8")
    return folder


def real_training_available() -> bool:
    """The diffusers runtime (tiny built-in models) is importable in this checkout."""
    return importlib.util.find_spec("trainer.models.diffusers_runtime") is not None


def fake_runner(step_s: float = 0.25):
    """A runner with the real ``run_job`` contract that emits events and writes a CSV and a file."""

    def run(settings, host, *, events, stop, logs_root=None, json_root=None) -> dict[str, Any]:
        total = settings.train_iterations
        name = settings.save_lora_name
        events.emit(RunSummary(mode=settings.mode, pass_index=1, total_steps=total, batch_size=settings.train_batch_size))
        stamp = time.strftime("%Y%m%d_%H%M%S")
        sink = CsvSink(csv_path(logs_root, name, stamp), {"save_lora_name": name}) if logs_root else None
        if sink:
            events.add(sink)
        tracker = LossTracker(total)
        events.emit(Message("info", f"training {name} (stand-in runner)"))
        for step in range(1, total + 1):
            time.sleep(step_s)
            loss = 0.5 + 0.4 * math.cos(step / 3.0) * math.exp(-step / total)
            ema = tracker.update(loss)
            elapsed, eta = tracker.timing(step)
            lr = 1e-4 * (0.5 + 0.5 * math.cos(math.pi * step / total))
            events.emit(ProgressEvent(step, total, loss, ema, {"unet": lr}, 1, elapsed, eta))
            request = stop()
            if request:
                path = Path(host.lora_dir()) / f"{name}_{step}steps.safetensors"
                if request == "save":
                    path.write_bytes(b"stand-in")
                    return {"status": "saved_stop", "message": f"Stopped and saved the LoRA to {path}",
                            "lora_path": str(path), "steps": step}
                return {"status": "stopped", "message": "Stopped", "lora_path": None, "steps": step}
        path = Path(host.lora_dir()) / f"{name}.safetensors"
        path.write_bytes(b"stand-in")
        return {"status": "done", "lora_path": str(path), "steps": total,
                "message": f"Done. LoRA saved to {path} ({total} steps, {total * step_s:.1f} s)"}

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo, launch_kwargs: dict[str, Any], tries: int = 3) -> str:
    """Launch ``demo`` on a free loopback port without blocking; returns the URL.

    gradio 3.41 sometimes reports a busy port on a loaded machine (platform §6): retry on another port.
    """
    last: Exception | None = None
    for _ in range(tries):
        port = free_port()
        try:
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs)
            return f"http://127.0.0.1:{port}/"
        except OSError as err:
            last = err
            time.sleep(1.0)
    raise RuntimeError(f"gradio did not start: {last}")


ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / os.environ.get("TT_ARTIFACT_TAG", "current")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """The standalone app on a free loopback port: (url, worker, paths, dataset folder)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from trainer.hosts.standalone import StandaloneHost
    from trainer.jobs import Worker
    from trainer.ui.app import AppPaths, build_app

    base = tmp_path_factory.mktemp("ttapp")
    paths = AppPaths.under(base, base / "state")
    shutil.copytree(ROOT / "presets", paths.presets_dir)
    data = make_dataset(base / "data")
    host = StandaloneHost(None, base / "lora")
    runner = None if real_training_available() and not os.environ.get("TT_FAKE_RUNNER") else fake_runner()
    worker = Worker(host, paths.state_dir, logs_root=paths.logs_root, json_root=paths.json_root, runner=runner)
    demo, launch_kwargs = build_app(worker, host, paths)
    url = launch(demo, launch_kwargs)
    yield {"url": url, "worker": worker, "paths": paths, "data": data, "real": runner is None}
    worker.stop_all()
    worker.wait_idle(60)
    # gradio 3.41's close() can wait forever on its polling loop: give it a few seconds, then move on.
    closer = threading.Thread(target=demo.close, daemon=True)
    closer.start()
    closer.join(10)


@pytest.fixture(scope="session")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, app, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.on("dialog", lambda d: d.accept())  # confirm() before Stop: answer yes
    pg.goto(app["url"], wait_until="load")
    pg.wait_for_selector("#tt_start", timeout=30_000)
    yield pg
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end.png"), full_page=True)
    context.close()
