"""Suite-wide test settings."""

from __future__ import annotations

import os

import torch

# Tiny models gain nothing from several threads, and OpenMP spin-waiting under a loaded machine made
# one tiny forward 60x slower (1.9 s instead of 31 ms) with 2 threads. One thread keeps timings sane.
torch.set_num_threads(int(os.environ.get("TRAINTRAIN_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


import socket  # noqa: E402

import pytest  # noqa: E402

_LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0")
_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family == getattr(socket, "AF_UNIX", None) or str(host).startswith(_LOOPBACK):
        return _real_connect(self, address)
    raise OSError(f"test tried to reach the network ({address}); nothing may fetch at run time")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every test runs with outbound connections refused: nothing may fetch from a hub at run time."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield
