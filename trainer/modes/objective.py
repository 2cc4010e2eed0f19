"""The training objective, one protocol with two implementations (R9: chosen once at setup).

Modes never write the forward process themselves: they ask the run's :class:`Objective` for
timesteps, the noisy input, the regression target and the loss. Two implementations exist:

* :class:`DDPMObjective` — x_t = √ᾱ·x₀ + √(1−ᾱ)·ε over the model's ᾱ table (zero-terminal SNR
  included), target ε or v, integer timesteps in [0, 1000), min-SNR weighting. This is the SD1/SD2/SDXL
  behaviour, draw for draw: the same generator calls in the same order.
* :class:`FlowObjective` — rectified flow: x_σ = (1−σ)·x₀ + σ·ε, target ε − x₀ (the velocity),
  σ ∈ (0, 1) drawn uniform, sigmoid(N(0,1)) or logit-normal, then moved by the family's shift
  (``σ' = s·σ / (1 + (s−1)·σ)``; with a resolution rule, s = exp(μ) where μ grows linearly with the
  latent token count, as Flux-style schedulers do). Timesteps are float σ.

Settings keep their DDPM units: ``train_min/max_timesteps`` in [0, 1000] become the σ range
[min/1000, max/1000] for flow, and ADDifT's fixed decile timesteps are shifted like drawn ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from trainer.errors import SettingsError
from trainer.modes.common import DenoiseLoss, NoiseSchedule, sample_timesteps
from trainer.settings import FLOW_SAMPLINGS


@runtime_checkable
class Objective(Protocol):
    """What a mode needs to noise latents and score predictions."""

    kind: str  # "ddpm" or "flow"

    def sample_t(self, batch: int, lo: int, hi: int, *, fixed_in_batch: bool, generator: torch.Generator,
                 device: torch.device, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Timesteps for a batch; ``lo``/``hi`` in the settings' [0, 1000] units."""
        ...

    def at(self, value: int, batch: int, device: torch.device,
           latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The timestep ``value`` (settings units) for every sample of a batch."""
        ...

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def loss(self, name: str, snr_gamma: float) -> DenoiseLoss: ...


class DDPMObjective:
    """ε- or v-prediction over a discrete ᾱ table (today's SD1/SD2/SDXL objective, unchanged)."""

    kind = "ddpm"

    def __init__(self, schedule: NoiseSchedule, v_pred: bool) -> None:
        self.schedule, self.v_pred = schedule, v_pred

    def sample_t(self, batch: int, lo: int, hi: int, *, fixed_in_batch: bool, generator: torch.Generator,
                 device: torch.device, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        return sample_timesteps(batch, lo, hi, fixed_in_batch=fixed_in_batch, generator=generator, device=device)

    def at(self, value: int, batch: int, device: torch.device,
           latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        return torch.full((batch,), int(value), device=device, dtype=torch.long)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, eps, t)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.v_target(x0, eps, t) if self.v_pred else eps

    def loss(self, name: str, snr_gamma: float) -> DenoiseLoss:
        return DenoiseLoss(name, snr_gamma, self.v_pred, self.schedule)


@dataclass(frozen=True)
class FlowSchedule:
    """A flow family's timestep facts, read from its scheduler config.

    Attributes:
        shift: the constant shift s (Z-Image and Anima: 3.0).
        dynamic: resolution-dependent shift (``use_dynamic_shifting``): s = exp(μ), μ linear in tokens.
        base_seq_len, max_seq_len, base_shift, max_shift: the two points of the μ line.
        patch: latent pixels per token side (2 for both families), for the token count.
    """

    shift: float = 1.0
    dynamic: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch: int = 2

    @staticmethod
    def from_config(config: dict) -> FlowSchedule:
        return FlowSchedule(
            shift=float(config.get("shift", 1.0)), dynamic=bool(config.get("use_dynamic_shifting", False)),
            base_seq_len=int(config.get("base_image_seq_len", 256)), max_seq_len=int(config.get("max_image_seq_len", 4096)),
            base_shift=float(config.get("base_shift", 0.5)), max_shift=float(config.get("max_shift", 1.15)),
        )

    def shift_for(self, latent_hw: tuple[int, int] | None) -> float:
        """The shift s at this latent size (constant unless the family shifts by resolution)."""
        if not self.dynamic or latent_hw is None:
            return self.shift
        tokens = (latent_hw[0] // self.patch) * (latent_hw[1] // self.patch)
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return math.exp(self.base_shift + slope * (tokens - self.base_seq_len))

    def apply(self, sigma: torch.Tensor, latent_hw: tuple[int, int] | None) -> torch.Tensor:
        s = self.shift_for(latent_hw)
        return s * sigma / (1 + (s - 1) * sigma)


FLOW_SAMPLING = FLOW_SAMPLINGS[1:]  # the settings' choices less "model" (the family's own)


class FlowObjective:
    """Rectified flow: velocity target ε − x₀ on x_σ = (1−σ)·x₀ + σ·ε."""

    kind = "flow"

    def __init__(self, schedule: FlowSchedule, sampling: str = "logit_normal", *, logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> None:
        if sampling not in FLOW_SAMPLING:
            raise SettingsError("flow_timestep_sampling", f"unknown '{sampling}'; choose one of {', '.join(FLOW_SAMPLING)}")
        self.schedule, self.sampling, self.logit_mean, self.logit_std = schedule, sampling, logit_mean, logit_std

    def _unit(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws in (0, 1) before the shift."""
        if self.sampling == "uniform":
            return torch.rand(n, generator=generator, device=generator.device)
        z = torch.randn(n, generator=generator, device=generator.device)
        if self.sampling == "logit_normal":
            z = z * self.logit_std + self.logit_mean
        return torch.sigmoid(z)

    def sample_t(self, batch: int, lo: int, hi: int, *, fixed_in_batch: bool, generator: torch.Generator,
                 device: torch.device, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        u = self._unit(1 if fixed_in_batch else batch, generator).to(device)
        sigma = lo / 1000 + (hi - lo) / 1000 * self.schedule.apply(u, latent_hw)
        return sigma.expand(batch).contiguous() if fixed_in_batch else sigma

    def at(self, value: int, batch: int, device: torch.device,
           latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        sigma = self.schedule.apply(torch.tensor([min(value, 999) / 1000], device=device), latent_hw)
        return sigma.expand(batch).contiguous()

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0

    def loss(self, name: str, snr_gamma: float) -> DenoiseLoss:
        return DenoiseLoss(name, 0.0, False, None)  # min-SNR is a DDPM weighting: see check_flow_settings


def objective_for(bundle, settings=None) -> Objective:
    """The bundle's objective: flow when it carries a ``flow`` schedule, DDPM over its ᾱ table otherwise.

    ``settings.flow_timestep_sampling`` ("model" = the bundle's choice) and ``settings.flow_shift`` (0 = the
    family's scheduler config, dynamic shift included; s > 0 = that constant shift) shape the flow draws.

    Raises:
        SettingsError: a flow setting chosen for a DDPM model, where it would silently mean nothing.
    """
    sampling = str(getattr(settings, "flow_timestep_sampling", "model") or "model")
    shift = float(getattr(settings, "flow_shift", 0.0) or 0.0)
    flow = getattr(bundle, "flow", None)
    if flow is None:
        if sampling != "model":
            raise SettingsError("flow_timestep_sampling", f"'{sampling}' applies to flow-matching models (Z-Image, "
                                                          "Anima) only; this model is DDPM: set it to model")
        if shift:
            raise SettingsError("flow_shift", f"{shift:g} applies to flow-matching models (Z-Image, Anima) only; "
                                              "this model is DDPM: set flow_shift 0")
        return DDPMObjective(NoiseSchedule(bundle.alphas_cumprod), bool(bundle.v_pred))
    if shift:
        flow = dataclasses.replace(flow, shift=shift, dynamic=False)
    return FlowObjective(flow, getattr(bundle, "flow_sampling", "logit_normal") if sampling == "model" else sampling)


def check_flow_settings(s, note) -> None:
    """Refuse the DDPM-only noise tweaks on a flow model; note that min-SNR does not apply.

    Raises:
        SettingsError: noise offset, multires noise or v-prediction set for a flow-matching model.
    """
    from trainer.settings import FIELD_BY_KEY

    if s.mode in FIELD_BY_KEY["noise_offset"].modes:
        if float(s.noise_offset) > 0:
            raise SettingsError("noise_offset", "a flow-matching model reaches pure noise at σ = 1, so offset noise "
                                                "has nothing to fix; set noise_offset 0")
        if int(s.multires_noise_iterations) > 0:
            raise SettingsError("multires_noise_iterations", "pyramid noise is a DDPM remedy and breaks the flow "
                                                             "path x = (1−σ)·x₀ + σ·ε; set multires_noise_iterations 0")
    if bool(getattr(s, "model_v_pred", False)):
        raise SettingsError("model_v_pred", "a flow-matching model already predicts the velocity ε − x₀; "
                                            "v-prediction is a DDPM target: untick model_v_pred")
    if float(getattr(s, "train_snr_gamma", 0) or 0) > 0:
        note("train_snr_gamma: min-SNR weighting is a DDPM notion; this flow-matching model trains unweighted "
             "(set train_snr_gamma 0 to silence this)")
