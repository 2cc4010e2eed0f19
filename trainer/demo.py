"""The demo: a generated picture set and a short LoRA run on a built-in tiny model."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def make_sample_dataset(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` images of coloured shapes with ``.txt`` captions into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        color = tuple(rng.randrange(64, 256) for _ in range(3))
        width = size if i % 2 == 0 else size * 3 // 2  # two aspect ratios exercise the buckets
        img = Image.new("RGB", (width, size), (16, 16, 24))
        draw = ImageDraw.Draw(img)
        x0, y0 = rng.randrange(0, width // 3), rng.randrange(0, size // 3)
        box = (x0, y0, x0 + size // 2, y0 + size // 2)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
        img.save(folder / f"{shape}_{i:02d}.png")
        (folder / f"{shape}_{i:02d}.txt").write_text(f"a {shape}, plain background", encoding="utf-8")
    return folder


def run_demo(out: Path, *, steps: int = 60, model: str = "tiny-sd1") -> Path:
    """Generate data under ``out/data`` and train ``out/lora/demo.safetensors``; return its path."""
    from trainer.hosts.standalone import StandaloneHost
    from trainer.progress import Events, TqdmSink
    from trainer.runner import run_job
    from trainer.settings import Settings

    data = make_sample_dataset(out / "data")
    settings = Settings.from_layers({
        "mode": "LoRA", "model": model, "lora_data_directory": str(data), "save_lora_name": "demo",
        "image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32,
        "train_iterations": steps, "train_batch_size": 2, "train_learning_rate": "1e-3", "network_rank": 4,
        "network_alpha": 4, "lora_trigger_word": "demo", "train_seed": 0, "save_overwrite": True,
        "train_model_precision": "fp32",
    })
    events = Events([TqdmSink()])
    try:
        result = run_job(settings, StandaloneHost(lora_dir=out / "lora"), events=events, logs_root=out / "logs")
    finally:
        events.close()
    print(result["message"])
    return Path(result["lora_path"])
