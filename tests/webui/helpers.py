"""Helpers shared by the Web-UI tests."""

from __future__ import annotations

import hashlib

import torch


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
