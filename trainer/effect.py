"""The effect check: how much does a LoRA change the U-Net output? (catches "trained but useless")."""

from __future__ import annotations

import contextlib

import torch

from trainer.models.bundle import Cond  # noqa: F401  (type of ``cond``)


@torch.no_grad()
def measure_effect(
    bundle,
    network,
    cond: Cond,
    *,
    latent_hw: tuple[int, int],
    multiplier: float = 1.0,
    timestep: int = 500,
    seed: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> float:
    """Relative change ‖U(m) − U(0)‖ / ‖U(0)‖ of the denoiser output on a fixed noisy latent.

    Args:
        bundle: the model (adapters attached).
        network: the network whose multiplier is varied.
        cond: conditioning for one sample.
        latent_hw: latent height and width of the probe.
        multiplier: the LoRA strength compared against 0.

    Returns:
        The relative change (0 means the LoRA does nothing; NaN means it is broken).
    """
    gen = torch.Generator(device=bundle.device).manual_seed(seed)
    channels = getattr(bundle, "latent_channels", 4)
    x = torch.randn((1, channels, *latent_hw), generator=gen, device=bundle.device)
    t = torch.full((1,), timestep, device=bundle.device, dtype=torch.long)
    cond = cond.select([0])
    with autocast or contextlib.nullcontext():
        with network.scaled(0.0):
            base = bundle.predict(x, t, cond).float()
        with network.scaled(multiplier):
            adapted = bundle.predict(x, t, cond).float()
    return float((adapted - base).norm() / base.norm().clamp_min(1e-12))
