"""Child process for the kill test: a Worker running a long tiny job with two more queued, then it blocks.

Usage: ``python worker_child.py STATE_DIR LORA_DIR DATA_DIR``. Prints ``RUNNING`` once the long job has
taken a step, then sleeps until killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when run as a plain script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny  # noqa: E402

from trainer.hosts.standalone import StandaloneHost  # noqa: E402
from trainer.jobs import Worker  # noqa: E402


def main(state_dir: str, lora_dir: str, data_dir: str) -> None:
    worker = Worker(StandaloneHost(lora_dir=lora_dir, device="cpu"), Path(state_dir))
    worker.submit(tiny(lora_data_directory=data_dir, save_lora_name="long", train_iterations=100_000), start=True)
    for name in ("queued_a", "queued_b"):
        worker.submit(tiny(lora_data_directory=data_dir, save_lora_name=name), start=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        progress = worker.progress()
        if progress is not None and progress.step >= 1:
            print("RUNNING", flush=True)
            break
        time.sleep(0.05)
    time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:4])
