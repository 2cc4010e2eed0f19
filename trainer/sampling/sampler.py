"""A small denoising loop for previews: Euler and DDIM (η = 0) with classifier-free guidance.

Both work in k-diffusion's coordinates ``x = x_t / sqrt(ᾱ_t)``, where a step from σ to σ' is
``x ← x + (σ' − σ)·ε̂`` with ``σ = sqrt((1 − ᾱ)/ᾱ)``. That update *is* DDIM with η = 0 (Song et al. 2021,
eq. 14, divided by sqrt(ᾱ)), and it is the Euler method on the probability-flow ODE (Karras et al. 2022,
alg. 1). The two samplers differ where the Web-UI's do, in where they put their steps: Euler on
k-diffusion's even spacing of [999, 0] starting at σ_max, DDIM on ldm's "uniform" grid ``1, 1 + c, …``
with ``c = 1000 // steps``. The model is only reached through ``predict(noisy, t, cond)``, so ε- and
v-prediction and every family (SDXL's size conditioning included) work as in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.errors import SettingsError
from trainer.models.bundle import Cond

Predict = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
# zero-terminal-SNR schedules end at ᾱ = 0, i.e. σ = ∞; like A1111, start from this ᾱ instead (σ_max ≈ 4500)
ZERO_SNR_ALPHA_BAR = 4.8973451890853435e-08


def euler_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from the last (999) to 0, rounded (k-diffusion's discrete schedule)."""
    last = alphas_cumprod.shape[0] - 1
    return torch.linspace(last, 0, steps).round().long()


def ddim_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """ldm's uniform DDIM grid, highest first: ``1 + c·(steps − 1), …, 1 + c, 1`` with ``c = 1000 // steps``."""
    count = alphas_cumprod.shape[0]
    c = max(count // steps, 1)
    grid = torch.arange(0, min(steps * c, count), c)[:steps] + 1
    return grid.clamp_max(count - 1).flip(0).long()


SCHEDULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"Euler": euler_timesteps, "DDIM": ddim_timesteps}


def pick_schedule(name: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The timestep schedule of sampler ``name``.

    Raises:
        SettingsError: (``sample_sampler``) an unknown name, listing the choices.
    """
    if name not in SCHEDULES:
        raise SettingsError("sample_sampler", f"unknown '{name}'; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def _sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[t].double()
    return ((1 - a) / a).sqrt()


def sample_latents(
    predict: Predict,
    cond: Cond,
    uncond: Cond | None,
    *,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float,
    v_pred: bool,
    sampler: str = "Euler",
) -> torch.Tensor:
    """Denoise ``noise`` into latents (the model's latent scale, float32).

    Args:
        predict: the denoiser, ``bundle.predict``; called with a batch of 2 (uncond, cond) under guidance.
        cond, uncond: ``Cond`` of batch 1 each, encoded together (equal token lengths); ``uncond`` may be
            None when ``cfg_scale`` is 1.
        alphas_cumprod: (1000,) the model's noise schedule.
        noise: (1, C, h, w) standard normal noise (drawn by the caller from its own generator).
        steps: model evaluations (each one forward of batch 2 under guidance).
        cfg_scale: guidance scale; 1 disables the unconditional pass.
        v_pred: the model predicts v instead of ε.
        sampler: ``Euler`` or ``DDIM``.

    Returns:
        The denoised latents, (1, C, h, w) float32.

    Raises:
        SettingsError: an unknown sampler.
    """
    ac = alphas_cumprod.detach().float().cpu().clamp_min(ZERO_SNR_ALPHA_BAR)
    ts = pick_schedule(sampler)(ac, steps)
    sigmas = torch.cat([_sigma(ac, ts), torch.zeros(1, dtype=torch.float64)])
    guided = uncond is not None and cfg_scale != 1.0
    both = Cond.cat([uncond, cond]) if guided else cond
    x = noise.double() * sigmas[0]  # k-diffusion space: x_t / sqrt(ᾱ_t), so x_T = σ_max · ε
    for i, t in enumerate(ts):
        sigma = sigmas[i]
        x_t = (x / (sigma**2 + 1).sqrt()).float()  # back to the model's input scale: sqrt(ᾱ)·x
        batch = torch.cat([x_t, x_t]) if guided else x_t
        out = predict(batch, t.repeat(batch.shape[0]).to(noise.device), both).double()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
        eps = _eps(out, x_t.double(), float(ac[t]), v_pred)
        x = x + (sigmas[i + 1] - sigma) * eps
    return x.float()


def _eps(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, v_pred: bool) -> torch.Tensor:
    """ε from the model output: v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀ gives ε = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t."""
    if not v_pred:
        return out
    return alpha_bar**0.5 * out + (1 - alpha_bar) ** 0.5 * x_t



def flow_sigmas(steps: int, shift_for_size) -> torch.Tensor:
    """``steps + 1`` σ from 1 to 0: an even grid moved by the family's shift (``shift_for_size(u)``)."""
    return shift_for_size(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))


def sample_flow(
    predict: Predict,
    cond: Cond,
    uncond: Cond | None,
    *,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float,
    shift,
) -> torch.Tensor:
    """Euler on the rectified-flow ODE dx/dσ = v̂ (the model's velocity ε − x₀), from pure noise at σ = 1.

    Args:
        shift: maps unshifted σ ∈ [0, 1] to the family's shifted σ (``FlowSchedule.apply`` at this size).

    Returns:
        The latents at σ = 0, (1, C, h, w) float32.
    """
    sigmas = flow_sigmas(steps, shift)
    guided = uncond is not None and cfg_scale != 1.0
    both = Cond.cat([uncond, cond]) if guided else cond
    x = noise.double()
    for i in range(steps):
        batch = torch.cat([x, x]).float() if guided else x.float()
        t = torch.full((batch.shape[0],), float(sigmas[i]), device=noise.device)
        out = predict(batch, t, both).double()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
        x = x + (sigmas[i + 1] - sigmas[i]) * out
    return x.float()
