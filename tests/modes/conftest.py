"""Shared helpers for the mode tests: tiny models, generated images, and running a job for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from trainer.hosts.standalone import StandaloneHost
from trainer.progress import Events, HistorySink
from trainer.runner import run_job
from trainer.settings import Settings

BASE = {
    "image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32, "train_batch_size": 2,
    "train_seed": 0, "train_model_precision": "fp32", "save_precision": "fp32", "save_overwrite": True,
    "train_lr_scheduler": "constant", "network_rank": 4, "network_alpha": 4, "logging_save_csv": False,
}


def draw_image(path: Path, color, box=(12, 12, 44, 44), size=(64, 64), shape="rect") -> Path:
    img = Image.new("RGB", size, (20, 20, 30))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=color)
    img.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 200, 40)]):
        draw_image(folder / f"img{i}.png", color, box=(8 + 4 * i, 10, 40 + 4 * i, 50), shape="ellipse" if i % 2 else "rect")
        (folder / f"img{i}.txt").write_text("a shape", encoding="utf-8")
    return folder


@pytest.fixture
def image_pair(tmp_path) -> tuple[Path, Path]:
    orig = draw_image(tmp_path / "orig.png", (220, 40, 40))
    targ = draw_image(tmp_path / "targ.png", (40, 60, 230))
    return orig, targ


class Trainer:
    """Runs jobs through the real runner; remembers every network the modes built."""

    def __init__(self, tmp_path: Path, monkeypatch) -> None:
        import trainer.modes.setup as setup

        self.lora_dir = tmp_path / "lora"
        self.host = StandaloneHost(lora_dir=self.lora_dir, device="cpu")
        self.networks = []
        original = setup.build_adapters

        def spy(*args, **kwargs):
            network = original(*args, **kwargs)
            self.networks.append(network)
            return network

        monkeypatch.setattr(setup, "build_adapters", spy)
        for module in ("lora", "ileco", "difference", "addift", "multi_addift"):
            mod = __import__(f"trainer.modes.{module}", fromlist=["build_adapters"])
            monkeypatch.setattr(mod, "build_adapters", spy)

    def run(self, **values) -> dict:
        settings = Settings.from_layers(BASE, values)
        history = HistorySink()
        result = run_job(settings, self.host, events=Events([history]))
        result["history"] = history
        return result

    def bundle(self, model: str):
        with self.host.acquire(model, "", precision="fp32", v_pred=None) as bundle:
            return bundle


@pytest.fixture
def trainer(tmp_path, monkeypatch) -> Trainer:
    return Trainer(tmp_path, monkeypatch)


def fixed_noise(shape, seed: int = 123) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
