"""Helpers shared by the Web-UI tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image


def fingerprint(model: torch.nn.Module) -> dict:
    """Every state_dict tensor's bytes, every requires_grad/training flag, every instance forward."""
    h = hashlib.blake2b()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str((v.dtype, v.device, tuple(v.shape))).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "tensors": h.hexdigest(),
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": sum(p.grad is not None for p in model.parameters()),
        "training": [m.training for m in model.modules()],
        "forwards": sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
        "is_trainable": sorted((n, m.__dict__["is_trainable"]) for n, m in model.named_modules() if "is_trainable" in m.__dict__),
    }


def mode_inputs(mode: str, tmp_path: Path) -> dict:
    """The job inputs of ``mode`` on 64 px pictures made in ``tmp_path`` (pairs named ``*_t``)."""
    if mode in ("LoRA", "Multi-ADDifT"):
        folder = tmp_path / "data"
        folder.mkdir(exist_ok=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (200, 50 * i, 40)).save(folder / f"a{i}.png")
            Image.new("RGB", (64, 64), (40, 50 * i, 200)).save(folder / f"a{i}_t.png")
        return {"lora_data_directory": str(folder), "diff_target_name": "_t"}
    if mode == "iLECO":
        return {"original prompt": "a photo", "target prompt": "red"}
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "o.png")
    Image.new("RGB", (64, 64), (40, 40, 200)).save(tmp_path / "t.png")
    return {"original image": str(tmp_path / "o.png"), "target image": str(tmp_path / "t.png")}
