"""The persistent queue and the worker: order, failures, stop, duplicates, restart."""

from __future__ import annotations

import json
import threading
import time

import pytest

from trainer.errors import InputError, SettingsError, ValidationError
from trainer.jobs import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, STOPPED, Worker
from trainer.progress import ProgressEvent
from trainer.settings import Settings


class FakeHost:
    name = "fake"

    def lora_dir(self):
        return None

    def interrupted(self):
        return False

    def report(self, step, total, text):
        self.last = (step, total)


def settings(name: str, tmp_path, **extra) -> Settings:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Settings.from_layers({"mode": "LoRA", "save_lora_name": name, "lora_data_directory": str(data), **extra})


class Runner:
    """Records the order jobs ran in; a job named 'bad*' fails, 'slow*' runs until stopped."""

    def __init__(self):
        self.order: list[str] = []
        self.started = threading.Event()

    def __call__(self, s, host, *, events, stop, logs_root, json_root):
        self.order.append(s.save_lora_name)
        if s.save_lora_name.startswith("bad"):
            raise InputError("lora_data_directory", "has no images; add some")
        if s.save_lora_name.startswith("crash"):
            raise RuntimeError("boom")
        steps = 1000 if s.save_lora_name.startswith("slow") else 3
        for step in range(1, steps + 1):
            events.emit(ProgressEvent(step, steps, 1.0 / step, 1.0 / step, {"unet": 1e-4}))
            self.started.set()
            request = stop()
            if request:
                return {"status": "saved_stop" if request == "save" else "stopped", "message": f"stopped at {step}"}
            time.sleep(0.005)
        return {"status": "done", "message": f"Successfully created {s.save_lora_name}", "lora_path": "x"}


def make_worker(tmp_path, runner=None) -> tuple[Worker, Runner]:
    runner = runner or Runner()
    return Worker(FakeHost(), tmp_path / "state", runner=runner), runner


def test_jobs_run_in_order_and_a_failing_job_never_blocks_the_next(tmp_path):
    worker, runner = make_worker(tmp_path)
    worker.submit(settings("one", tmp_path), start=False)
    worker.submit(settings("bad", tmp_path), start=False)
    worker.submit(settings("crash", tmp_path), start=False)
    worker.submit(settings("four", tmp_path), start=True)
    assert worker.wait_idle(30)
    assert runner.order == ["four", "one", "bad", "crash"]  # Start runs its own job first, then the queue
    status = {r.name: (r.status, r.message) for r in worker.records()}
    assert status["one"][0] == DONE and status["four"][0] == DONE
    assert status["bad"] == (FAILED, "Error: lora_data_directory: has no images; add some")
    assert status["crash"][0] == FAILED and "boom" in status["crash"][1]


def test_duplicate_names_are_refused_and_validation_lists_every_problem(tmp_path):
    worker, _ = make_worker(tmp_path)
    worker.submit(settings("same", tmp_path), start=False)
    with pytest.raises(SettingsError, match="save_lora_name.*already queued"):
        worker.submit(settings("same", tmp_path), start=False)
    bad = settings("ok", tmp_path, network_rank="0", train_min_timesteps="900", train_max_timesteps="100")
    with pytest.raises(ValidationError) as err:
        worker.submit(bad, start=False)
    assert len(err.value.problems) >= 2 and "network_rank" in str(err.value) and "train_min_timesteps" in str(err.value)


def test_queue_survives_a_restart_and_a_running_job_is_marked_interrupted(tmp_path):
    worker, _ = make_worker(tmp_path)
    worker.submit(settings("a", tmp_path), start=False)
    worker.submit(settings("b", tmp_path), start=False)
    raw = json.loads((tmp_path / "state" / "queue.json").read_text())
    raw["jobs"][0]["status"] = "running"  # as if the process died mid-run
    (tmp_path / "state" / "queue.json").write_text(json.dumps(raw))
    again, runner = make_worker(tmp_path)
    assert [(r.name, r.status) for r in again.records()] == [("a", INTERRUPTED), ("b", QUEUED)]
    again.run_queue()
    assert again.wait_idle(30) and runner.order == ["b"]


def test_stop_stops_only_the_running_job_and_stop_all_cancels_the_rest(tmp_path):
    worker, runner = make_worker(tmp_path)
    worker.submit(settings("slow1", tmp_path), start=True)
    worker.submit(settings("next", tmp_path), start=False)
    assert runner.started.wait(10)
    assert worker.progress() is not None and worker.history()
    assert worker.stop() == "Stopping…"
    assert worker.wait_idle(30)
    assert [(r.name, r.status) for r in worker.records()] == [("slow1", STOPPED), ("next", DONE)]
    runner.started.clear()
    worker.submit(settings("slow2", tmp_path), start=True)
    worker.submit(settings("later", tmp_path), start=False)
    assert runner.started.wait(10)
    worker.stop_all()
    assert worker.wait_idle(30)
    status = {r.name: r.status for r in worker.records()}
    assert status["slow2"] == STOPPED and status["later"] == CANCELLED
    assert worker.stop() == "Nothing is training."


def test_images_are_copied_into_the_job_folder(tmp_path):
    from PIL import Image

    for name in ("o.png", "t.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    worker, _ = make_worker(tmp_path)
    s = Settings.from_layers({"mode": "ADDifT", "save_lora_name": "pair", "original image": str(tmp_path / "o.png"),
                              "target image": str(tmp_path / "t.png")})
    record = worker.submit(s, start=False)
    (tmp_path / "o.png").unlink()  # the queued job no longer depends on the original file
    copied = record.settings["original image"]
    assert copied.startswith(str(tmp_path / "state" / "jobs" / record.job_id)) and (tmp_path / copied).exists()


def test_delete_and_move(tmp_path):
    worker, _ = make_worker(tmp_path)
    ids = [worker.submit(settings(n, tmp_path), start=False).job_id for n in ("a", "b", "c")]
    worker.move(ids[2], -2)
    assert [r.name for r in worker.records()] == ["c", "a", "b"]
    worker.delete(ids[0])
    assert [r.name for r in worker.records()] == ["c", "b"]
