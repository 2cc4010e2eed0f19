"""Faults: a full disk or read-only folder while saving, a NaN loss, a killed process, Stop and Start at
the wrong moment, a failing job in the queue. No fault may lose work that was already saved."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

import trainer.paths
from trainer.errors import StopTraining, TrainTrainError
from trainer.jobs import DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, STOPPED, Worker
from trainer.runner import run_job

from .helpers import assert_clear, assert_no_partial, run, tiny

HERE = Path(__file__).resolve().parent


# -- saving -------------------------------------------------------------------------------------------


def _previous_good(host) -> tuple[Path, bytes]:
    import torch
    from safetensors.torch import save_file

    path = host.lora_dir() / "fault.safetensors"
    save_file({"previous": torch.ones(3)}, str(path), metadata={"good": "yes"})
    return path, path.read_bytes()


@pytest.mark.parametrize("where, err", [
    ("replace", OSError(errno.ENOSPC, "No space left on device")),
    ("fsync", OSError(errno.ENOSPC, "No space left on device")),
    ("mkstemp", OSError(errno.EROFS, "Read-only file system")),
])
def test_disk_full_or_read_only_during_save(host, dataset, monkeypatch, where, err):
    path, before = _previous_good(host)
    target = {"replace": trainer.paths.os, "fsync": trainer.paths.os, "mkstemp": trainer.paths.tempfile}[where]

    def fail(*args, **kwargs):
        raise err

    monkeypatch.setattr(target, where, fail)
    with pytest.raises(TrainTrainError) as info:
        run(tiny(lora_data_directory=str(dataset), save_lora_name="fault", save_overwrite=True), host)
    assert_clear(str(info.value), "fault.safetensors", "free disk space")
    assert err.strerror in str(info.value)
    assert path.read_bytes() == before, "the previous good file was touched"
    monkeypatch.undo()
    assert_no_partial(host.lora_dir())


def test_nan_loss_stops_says_so_and_keeps_the_last_periodic_save(host, dataset, monkeypatch):
    from trainer.modes import common

    original = common.DenoiseLoss.__call__
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(common.DenoiseLoss, "__call__", poisoned)
    settings = tiny(lora_data_directory=str(dataset), save_lora_name="nan", train_iterations=4, save_per_steps=2)
    with pytest.raises(StopTraining) as info:
        run(settings, host)
    message = str(info.value)
    assert_clear(message, "step 3", "lower train_learning_rate")
    kept = host.lora_dir() / "nan_2steps.safetensors"
    assert str(kept) in message and kept.is_file()
    with safe_open(str(kept), "pt") as handle:
        assert len(list(handle.keys())) > 0
    assert not (host.lora_dir() / "nan.safetensors").exists()
    assert_no_partial(host.lora_dir())


def test_huge_learning_rate_stops_cleanly(host, dataset):
    with pytest.raises(TrainTrainError) as info:
        # 10 is the largest rate validation accepts (1e30 is refused up front); Lion diverges with it
        run(tiny(lora_data_directory=str(dataset), save_lora_name="huge", train_learning_rate="10",
                 train_optimizer="Lion", train_iterations=30), host)
    message = str(info.value)
    assert "\n" not in message and ("nan" in message.lower() or "inf" in message.lower()), message
    assert "learning rate" in message or "train_learning_rate" in message
    assert not list(host.lora_dir().glob("*.safetensors"))
    assert_no_partial(host.lora_dir())


# -- the worker ----------------------------------------------------------------------------------------


def test_stop_while_idle(host, tmp_path):
    worker = Worker(host, tmp_path / "state")
    assert worker.stop() == "Nothing is training."
    assert worker.stop(save=True) == "Nothing is training."
    assert worker.run_queue() == "The queue is empty."


class CountingRunner:
    """The real runner, counting how many jobs train at the same time."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.order: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, settings, host, **kw):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.order.append(settings.save_lora_name)
        try:
            return run_job(settings, host, **kw)
        finally:
            with self.lock:
                self.active -= 1


def _wait_for_step(worker: Worker, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = worker.progress()
        if progress is not None and progress.step >= 1:
            return
        time.sleep(0.02)
    raise AssertionError("the job never took a step")


def test_start_pressed_twice_queues_the_second_and_never_trains_two_at_once(host, dataset, tmp_path):
    runner = CountingRunner()
    worker = Worker(host, tmp_path / "state", runner=runner)
    first = worker.submit(tiny(lora_data_directory=str(dataset), save_lora_name="first", train_iterations=10_000),
                          start=True)
    _wait_for_step(worker)
    second = worker.submit(tiny(lora_data_directory=str(dataset), save_lora_name="second"), start=True)
    assert worker.queue.find(second.job_id).status == QUEUED
    assert worker.queue.find(first.job_id).status == RUNNING
    assert worker.stop() == "Stopping…"
    assert worker.wait_idle(300)
    status = {r.name: r.status for r in worker.records()}
    assert status == {"first": STOPPED, "second": DONE}
    assert runner.max_active == 1 and runner.order == ["first", "second"]
    assert (host.lora_dir() / "second.safetensors").is_file()


def test_a_failing_job_never_blocks_the_next(host, dataset, tmp_path):
    worker = Worker(host, tmp_path / "state")
    worker.submit(tiny(lora_data_directory=str(tmp_path / "missing"), save_lora_name="bad"), start=False)
    worker.submit(tiny(lora_data_directory=str(dataset), save_lora_name="good"), start=False)
    assert worker.run_queue() == "Running the queue."
    assert worker.wait_idle(300)
    records = {r.name: r for r in worker.records()}
    assert records["bad"].status == FAILED
    assert_clear(records["bad"].message, "missing", "check the path")
    assert "Traceback" not in records["bad"].message
    assert records["good"].status == DONE and (host.lora_dir() / "good.safetensors").is_file()
    assert_no_partial(host.lora_dir())


def test_corrupt_queue_file_is_kept_aside_and_the_worker_starts(host, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (state / "queue.json").write_text('{"version": 1, "jobs": [{"job_id": "x", "na')
    worker = Worker(host, state)
    assert worker.records() == []
    assert "unreadable" in capsys.readouterr().out
    assert (state / "queue.corrupt.json").read_text().startswith('{"version": 1')
    json.loads((state / "queue.json").read_text())


# -- a killed process ------------------------------------------------------------------------------


def test_sigkill_mid_run_leaves_an_intact_queue_that_resumes(host, dataset, tmp_path):
    state, lora = tmp_path / "state", tmp_path / "child_lora"
    child = subprocess.Popen([sys.executable, str(HERE / "worker_child.py"), str(state), str(lora), str(dataset)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "RUNNING" not in line:
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                break
        assert "RUNNING" in line, f"the child never started training (exit {child.poll()})"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    raw = json.loads((state / "queue.json").read_text())  # intact JSON, never half-written
    assert [j["status"] for j in raw["jobs"]] == [RUNNING, QUEUED, QUEUED]
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]
    host._lora_dir = lora
    worker = Worker(host, state)
    records = {r.name: r for r in worker.records()}
    assert records["long"].status == INTERRUPTED and "interrupted" in records["long"].message
    assert records["queued_a"].status == QUEUED and records["queued_b"].status == QUEUED
    assert worker.run_queue() == "Running the queue."
    assert worker.wait_idle(300)
    records = {r.name: r for r in worker.records()}
    assert records["queued_a"].status == DONE and records["queued_b"].status == DONE
    assert records["long"].status == INTERRUPTED  # not re-run behind the user's back
    assert not (lora / "long.safetensors").exists()
    assert_no_partial(lora)
