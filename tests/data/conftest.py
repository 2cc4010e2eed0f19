"""Shared helpers for the data tests: tiny images written with PIL, and a counting fake VAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image


def write_image(path: Path, size: tuple[int, int], color=(200, 30, 30), mode: str = "RGB", fmt: str | None = None) -> Path:
    """Write a solid image of ``size`` (w, h) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


class CountingEncoder:
    """A fake VAE: 8x average pooling plus a 4th channel; counts calls and images."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        self.calls.append(pixels.shape[0])
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


@pytest.fixture
def encoder() -> CountingEncoder:
    return CountingEncoder()
