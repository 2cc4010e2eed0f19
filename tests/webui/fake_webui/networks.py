"""Fake of A1111's built-in Lora extension (``extensions-builtin/Lora/networks.py``): merge mode.

A "merged" module holds ``network_weights_backup`` and non-empty ``network_current_names``; with no
loaded networks, ``network_apply_weights`` restores the backup, as A1111 1.10 does.
"""

from __future__ import annotations

import torch

loaded_networks: list = []
refreshes: list[int] = []


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    loaded_networks.clear()
    loaded_networks.extend(names)


def merge_into(module: torch.nn.Module, delta: torch.Tensor, name: str = "leftover") -> None:
    """Test helper: what a generation with <lora:name:1> leaves behind in merge mode."""
    with torch.no_grad():
        module.network_weights_backup = module.weight.detach().clone()
        module.weight += delta
    module.network_current_names = ((name, 1.0, 1.0, None),)
    if name not in loaded_networks:
        loaded_networks.append(name)


def network_apply_weights(module: torch.nn.Module) -> None:
    wanted = tuple((n, 1.0, 1.0, None) for n in loaded_networks)
    current = getattr(module, "network_current_names", ())
    if current == wanted:
        return
    backup = getattr(module, "network_weights_backup", None)
    if backup is not None and current:
        module.weight.copy_(backup)
    module.network_current_names = wanted


def list_available_networks() -> None:
    refreshes.append(1)
