"""Train every shipped preset for a few steps on a tiny model and fingerprint the LoRA it writes.

Used by ``test_presets_unchanged.py`` and, run as a script, to record the fingerprints of the code
before a change (``PYTHONPATH=<old checkout> python tests/modes/preset_runs.py <presets dir> out.json``).
It only uses APIs that existed before the practitioners' settings, so the same file runs against both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

OVERRIDES = {
    "image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32, "train_iterations": 4,
    "train_model_precision": "fp32", "save_precision": "fp32", "save_per_steps": 0, "logging_save_csv": False,
    "save_as_json": False, "save_overwrite": True, "train_seed": 0,
}


def _image(path: Path, color: tuple[int, int, int], box: tuple[int, int, int, int]) -> str:
    img = Image.new("RGB", (64, 64), (20, 20, 30))
    ImageDraw.Draw(img).rectangle(box, fill=color)
    img.save(path)
    return str(path)


def make_inputs(root: Path) -> dict[str, str]:
    """A caption folder and an image pair, drawn deterministically."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 200, 40)]):
        _image(data / f"img{i}.png", color, (8 + 4 * i, 10, 40 + 4 * i, 50))
        (data / f"img{i}.txt").write_text("a shape, red, square", encoding="utf-8")
    return {
        "lora_data_directory": str(data),
        "original image": _image(root / "orig.png", (220, 40, 40), (12, 12, 44, 44)),
        "target image": _image(root / "targ.png", (40, 60, 230), (16, 16, 48, 48)),
        "original prompt": "a red square", "target prompt": "a blue square",
    }


def fingerprint(path: str) -> dict[str, list[float]]:
    """``{key: [sum, sum of |x|]}`` in float64: enough to tell two trained files apart."""
    from safetensors.torch import load_file

    return {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in sorted(load_file(path).items())}


def fingerprint_distance(got: dict[str, list[float]], want: dict[str, list[float]]) -> tuple[float, float]:
    """(mean, max) over tensors of how far a fingerprint moved, each relative to the tensor's recorded mass.

    Per tensor: ``max(|Δ sum|, |Δ sum|x||) / sum|x|``. Float noise (another CPU, thread count or BLAS kernel)
    moves a few tensors whose gradients are near zero, where Adam's normalised step amplifies rounding: measured
    on 5 presets, 1 vs 2 threads, mean 1.6e-7 to 3.5e-7, max 1.6e-5. A real change moves every tensor: +1% on
    ``train_snr_gamma`` gives mean 6.4e-4, +1% learning rate 3.3e-3.
    """
    ds = [max(abs(got[k][0] - total), abs(got[k][1] - size)) / max(size, 1e-30) for k, (total, size) in want.items()]
    return sum(ds) / len(ds), max(ds)


def run_preset(preset: Path, work: Path, extra: dict | None = None) -> dict[str, list[float]]:
    """Train ``preset`` (its own values, shortened and shrunk by OVERRIDES, then ``extra``) and fingerprint
    the result."""
    from trainer.hosts.standalone import StandaloneHost
    from trainer.progress import Events
    from trainer.runner import run_job
    from trainer.settings import Settings

    data = json.loads(preset.read_text(encoding="utf-8"))
    data.update(OVERRIDES)
    if isinstance(data.get("2nd pass"), dict):
        data["2nd pass"]["train_iterations"] = OVERRIDES["train_iterations"]
    data.update(make_inputs(work / "inputs"))
    data["model"] = "tiny-sdxl" if "XL" in preset.stem else "tiny-sd1"
    data["save_lora_name"] = preset.stem.replace(".", "_")
    data.update(extra or {})
    settings, _ = Settings.from_json_dict(data)
    torch.set_num_threads(1)
    host = StandaloneHost(lora_dir=work / "lora", device="cpu")
    result = run_job(settings, host, events=Events([]))
    return fingerprint(result["lora_path"])


if __name__ == "__main__":  # record: python tests/modes/preset_runs.py <presets dir> <out.json>
    import tempfile

    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    prints = {}
    for preset in sorted(folder.glob("*.json")):
        with tempfile.TemporaryDirectory() as tmp:
            prints[preset.stem] = run_preset(preset, Path(tmp))
    out.write_text(json.dumps(prints, indent=1, sort_keys=True), encoding="utf-8")
