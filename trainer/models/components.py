"""The parts of a diffusers model as plain objects, their configs, and strict weight loading.

``Components`` is what every loader returns (built-in, single file, diffusers folder) and what
``save_single_file`` writes; ``DiffusersBundle`` wraps it for training. Configs are plain dicts so they
can travel in safetensors metadata and rebuild non-standard (tiny) architectures exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.models.bundle import Family

CONFIG_ROOT = Path(__file__).parent / "configs"
TE_SLOTS = ("text_encoder", "text_encoder_2")


@dataclass
class Components:
    """A loaded (or built) model, before it is placed on a device.

    Attributes:
        family: SD1, SD2 or SDXL.
        unet: ``UNet2DConditionModel``.
        vae: ``AutoencoderKL``; None when a single file has none (``vae_config`` then says what fits).
        text_encoders: ``[CLIPTextModel]`` (SD1/SD2) or ``[CLIPTextModel, CLIPTextModelWithProjection]`` (SDXL).
        v_pred: True when the U-Net predicts v.
        scheduler: the noise-schedule config (``SCHEDULE_KEYS``: betas, ``prediction_type``, plus
            ``timestep_spacing``/``steps_offset`` for samplers and ``rescale_betas_zero_snr``).
        name: model name for metadata.
        vae_config: the VAE architecture when ``vae`` is None.
        tokenizers: one per text encoder when the model brought its own (a diffusers folder); None = the
            built-in CLIP tokenizer that fits the encoders' vocabulary.
        notes: what the loader decided that the user should know (EMA choice, detected v/zero-SNR).
    """

    family: Family
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    v_pred: bool = False
    scheduler: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    vae_config: dict[str, Any] | None = None
    tokenizers: list[Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def zero_snr(self) -> bool:
        """True for zero-terminal-SNR models (rescaled betas: ᾱ at the last step is exactly 0)."""
        return bool(self.scheduler.get("rescale_betas_zero_snr", False))

    def configs(self) -> dict[str, dict[str, Any]]:
        """Architecture configs by diffusers folder name (``unet``, ``vae``, ``text_encoder``, ...)."""
        vae = _plain(self.vae.config) if self.vae is not None else dict(self.vae_config or {})
        out: dict[str, dict[str, Any]] = {"unet": _plain(self.unet.config), "vae": vae}
        for slot, te in zip(TE_SLOTS, self.text_encoders, strict=False):
            out[slot] = te.config.to_dict()
        return out


def _plain(config: Any) -> dict[str, Any]:
    """A diffusers FrozenDict as a JSON-safe dict without private (``_``-prefixed) bookkeeping keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config), default=list)).items() if not k.startswith("_")}


def shipped_dir(family: Family, v_pred: bool = False) -> Path:
    """The shipped diffusers config folder of a standard architecture (SD1.5, SD2.1(-v), SDXL base)."""
    name = {"sd1": "sd1", "sd2": "sd2v" if v_pred else "sd2", "sdxl": "sdxl"}[family.value]
    return CONFIG_ROOT / name


def read_config_dir(folder: Path) -> dict[str, dict[str, Any]]:
    """Read ``<part>/config.json`` (and ``scheduler/scheduler_config.json``) of a diffusers folder."""
    out: dict[str, dict[str, Any]] = {}
    for part in ("unet", "vae", *TE_SLOTS):
        path = folder / part / "config.json"
        if path.is_file():
            out[part] = json.loads(path.read_text(encoding="utf-8"))
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        out["scheduler"] = json.loads(sched.read_text(encoding="utf-8"))
    return out


def build_unet(config: dict[str, Any]) -> nn.Module:
    """Build a ``UNet2DConditionModel`` from a config dict (random init on the current default device)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def build_vae(config: dict[str, Any]) -> nn.Module:
    """Build an ``AutoencoderKL`` from a config dict."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def build_text_encoder(config: dict[str, Any], with_projection: bool) -> nn.Module:
    """Build a CLIP text encoder (``CLIPTextModelWithProjection`` for SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_empty(configs: dict[str, dict[str, Any]]) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """Build U-Net, VAE and text encoders on the meta device (no memory, no init time) for loading."""
    with torch.device("meta"):
        unet = build_unet(configs["unet"])
        vae = build_vae(configs["vae"])
        tes = [build_text_encoder(configs[s], s == "text_encoder_2") for s in TE_SLOTS if s in configs]
    return unet, vae, tes


def fit_clip_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Match a CLIP state dict's ``text_model.`` prefix to the installed transformers (flattened in >= 5.6)."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a non-persistent buffer in current transformers; old exports carry it
        bare = key.removeprefix("text_model.") if key.startswith("text_model.") else key
        is_core = not bare.startswith("text_projection")
        out["text_model." + bare if wants_prefix and is_core else bare] = value
    return out


def load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every parameter of a meta-built ``model`` from ``state``; rebuild non-persistent buffers.

    Raises:
        ValueError: missing or unexpected keys, or a shape mismatch (message lists a few).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ValueError("; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        # CLIP's position_ids is the one non-persistent buffer among our parts; it stays on meta otherwise
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            module.position_ids = torch.arange(buf.shape[-1]).expand((1, -1))


# Scheduler-config keys that define the training noise (and, for samplers, the step spacing).
SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "trained_betas",
                 "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")


def default_scheduler(prediction_type: str = "epsilon") -> dict[str, Any]:
    """The SD1/SD2/SDXL training schedule: scaled_linear betas 0.00085 -> 0.012 over 1000 steps
    (samplers space steps "leading" with offset 1, as the shipped SD1.5/SDXL scheduler configs do)."""
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": prediction_type, "timestep_spacing": "leading",
            "steps_offset": 1, "rescale_betas_zero_snr": False}


def schedule_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The defaults overlaid with the ``SCHEDULE_KEYS`` of a (diffusers) scheduler config."""
    return {**default_scheduler(), **{k: config[k] for k in SCHEDULE_KEYS if config.get(k) is not None}}


def _cosine_betas(n: int) -> torch.Tensor:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1): √ᾱ is shifted so the last step is 0 and scaled so the first is kept.

    Args:
        alphas_cumprod: (T,) decreasing ᾱ.

    Returns:
        float32 ᾱ with ᾱ[-1] == 0 exactly.
    """
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).float()


def compute_alphas_cumprod(scheduler: dict[str, Any]) -> torch.Tensor:
    """``alphas_cumprod`` (float32, CPU) as diffusers' DDPMScheduler computes it for this config.

    Supports ``scaled_linear``, ``linear``, ``squaredcos_cap_v2`` and ``trained_betas``, and
    ``rescale_betas_zero_snr`` (then ᾱ[-1] == 0: the last step is pure noise).

    Raises:
        ValueError: another beta schedule.
    """
    n = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler.get("beta_start", 0.00085)), float(scheduler.get("beta_end", 0.012))
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if scheduler.get("trained_betas") is not None:
        betas = torch.tensor(scheduler["trained_betas"], dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"beta_schedule '{kind}' is not supported (scaled_linear, linear or squaredcos_cap_v2)")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if scheduler.get("rescale_betas_zero_snr"):
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod
