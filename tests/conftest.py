"""Suite-wide test settings."""

from __future__ import annotations

import os

import torch

# Tiny models gain nothing from several threads, and OpenMP spin-waiting under a loaded machine made
# one tiny forward 60x slower (1.9 s instead of 31 ms) with 2 threads. One thread keeps timings sane.
torch.set_num_threads(int(os.environ.get("TRAINTRAIN_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
