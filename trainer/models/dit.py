"""The flow-matching DiT families (Z-Image, Anima) as a ``ModelBundle``: ``DiTBundle``.

One bundle serves both families; what differs is one branch each in ``encode_prompts`` (how prompts become
context) and ``predict`` (how the transformer is called), and the VAE config (how latents are scaled). Everything else a mode sees is the same as for
SD: ``encode_prompts`` → ``Cond`` (with a token mask), ``predict(noisy, t, cond)`` and the objective,
which is rectified flow here (``bundle.flow``): ``predict`` returns the velocity ε − x₀ for float σ
timesteps (integer timesteps, as the effect check passes, are read as 0..999 of a 1000-step grid).

Facts per family (from the model configs Forge Neo ships, ``backend/huggingface/...``):

* Z-Image: ``ZImageTransformer2DModel`` takes a list of (C, 1, H, W) latents, t = 1 − σ and a list of
  caption features (the real tokens only); its output is x₀ − ε, so we negate it. Prompts go through the
  Qwen3 chat template (user turn, generation prompt) and the penultimate hidden state is used. VAE:
  Flux's AutoencoderKL, latents ``(z − shift_factor) · scaling_factor`` (0.1159, 0.3611 from its config).
* Anima: ``CosmosTransformer3DModel`` (Cosmos-Predict2) on (B, C, 1, H, W) with a padding-mask channel,
  timestep σ, output ε − x₀. Its context comes from the LLM adapter: T5 token ids of the prompt attend to
  Qwen3-0.6B's last hidden state. VAE: Qwen-Image (Wan) with per-channel ``latents_mean``/``latents_std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.models.bundle import Cond, Family, UNetShape
from trainer.models.diffusers_runtime import sample_latent
from trainer.modes.objective import FlowSchedule

# Qwen3's chat template for one user turn with the generation prompt (Z-Image's pipeline, thinking on)
QWEN_CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class DiTParts:
    """What a DiT bundle is built from (loaded or built-in).

    Attributes:
        family: ``Family.ZIMAGE`` or ``Family.ANIMA``.
        transformer: the denoiser.
        text_encoder: the Qwen3 model (``Qwen3Model``).
        tokenizer: its tokenizer (callable like a transformers tokenizer).
        vae: the family's VAE.
        scheduler: the scheduler config (shift, dynamic shifting).
        name: for metadata.
        adapter: Anima's LLM adapter (None for Z-Image).
        tokenizer_2: Anima's T5 tokenizer (None for Z-Image).
        turbo: a distilled (Turbo) checkpoint, for the training warning.
        notes: what loading decided.
    """

    family: Family
    transformer: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module
    scheduler: dict
    name: str
    adapter: nn.Module | None = None
    tokenizer_2: Any = None
    turbo: bool = False
    max_tokens: int = 512
    notes: list[str] | None = None


# The oldest diffusers these families were verified on: with 0.37.1 (Forge Neo's pin) the Z-Image
# transformer returns NaN on the same weights and inputs (measured on tiny-zimage); 0.42.1 is exact.
MIN_DIFFUSERS = (0, 42)


def check_diffusers_version(version: str) -> None:
    """Refuse Z-Image/Anima training on a diffusers older than :data:`MIN_DIFFUSERS` with one line.

    Raises:
        TrainTrainError: the installed diffusers is too old.
    """
    from trainer.errors import TrainTrainError

    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_DIFFUSERS:
        need = ".".join(map(str, MIN_DIFFUSERS))
        raise TrainTrainError(f"model: Z-Image and Anima training needs diffusers >= {need} (this environment has "
                              f"{version}, whose Z-Image transformer gives NaN here); upgrade diffusers in the "
                              "standalone environment (pip install -U diffusers)")


class DiTBundle:
    """A Z-Image or Anima model ready for adapter training (implements ``ModelBundle``).

    ``unet`` is the transformer (the modes' name for "the denoiser"); ``text_encoders`` is empty: the
    Qwen3 encoder is not adapted (its outputs are cached and it is offloaded, as for frozen CLIP).
    """

    layout = "dit"
    v_pred = False
    unet_shape = UNetShape(0, ())
    flow_sampling = "logit_normal"

    def __init__(self, parts: DiTParts, *, device: torch.device, dtype: torch.dtype) -> None:
        import diffusers

        check_diffusers_version(diffusers.__version__)
        self.parts = parts
        self.family = parts.family
        self.name = parts.name
        self.device, self.dtype = device, dtype
        self.unet: nn.Module = parts.transformer
        self.text_encoder, self.adapter, self.vae = parts.text_encoder, parts.adapter, parts.vae
        self.text_encoders: dict[str, nn.Module] = {}
        self.flow = FlowSchedule.from_config(parts.scheduler)
        self.alphas_cumprod = torch.zeros(1000, device=device)  # unused: flow models have no ᾱ table
        self.notes: list[str] = list(parts.notes or [])
        self.latent_channels = int(getattr(parts.vae.config, "z_dim", 0) or parts.vae.config.latent_channels)
        self.vae_scale_factor = 8
        self.turbo = parts.turbo
        for module in (self.unet, self.text_encoder, self.adapter, self.vae):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
                nn.Module.to(module, device=device, dtype=dtype)

    # -- text ---------------------------------------------------------------------------------------
    def _qwen(self, prompts: Sequence[str], template: str) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.parts.tokenizer
        rows = [tok(template.format(p), add_special_tokens=False)["input_ids"][: self.parts.max_tokens] for p in prompts]
        # an empty prompt is one pad token (as Forge Neo's Anima engine does), so no row is all padding
        rows = [r or [tok.pad_token_id] for r in rows]
        longest = max(len(r) for r in rows)
        te_device = next(self.text_encoder.parameters()).device
        ids = torch.tensor([r + [tok.pad_token_id] * (longest - len(r)) for r in rows], device=te_device)
        mask = torch.tensor([[True] * len(r) + [False] * (longest - len(r)) for r in rows], device=te_device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states, mask

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Qwen3 context with its token mask (Z-Image), or the LLM adapter's context (Anima)."""
        if self.family is Family.ZIMAGE:
            hidden, mask = self._qwen(prompts, QWEN_CHAT)
            return Cond(hidden[-2].to(self.device), None, mask=mask.to(self.device))
        hidden, mask = self._qwen(prompts, "{}")
        states = hidden[-1] * mask.unsqueeze(-1)  # padding tokens carry nothing into the adapter
        t5 = self.parts.tokenizer_2([str(p) for p in prompts], padding="longest", return_tensors="pt")
        ids, t5_mask = t5["input_ids"].to(states.device), t5["attention_mask"].to(states.device).bool()
        context = self.adapter(states.to(self.dtype), ids, source_mask=mask)
        return Cond(context.to(self.device), None, mask=t5_mask.to(self.device))

    # -- images ---------------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) per channel: latents = (z − shift) · scale."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shift = torch.tensor(mean, device=like.device).view(1, -1, 1, 1)
            scale = 1.0 / torch.tensor(std, device=like.device).view(1, -1, 1, 1)
        else:
            shift = torch.full((1, 1, 1, 1), float(getattr(cfg, "shift_factor", 0.0) or 0.0), device=like.device)
            scale = torch.full((1, 1, 1, 1), float(cfg.scaling_factor), device=like.device)
        return shift, scale

    def _video_vae(self) -> bool:
        return getattr(self.vae.config, "z_dim", None) is not None  # Wan/Qwen-Image VAE: (B, C, T, H, W)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae_device = next(self.vae.parameters()).device
        x = pixels.to(vae_device, self.dtype)
        x = x.unsqueeze(2) if self._video_vae() else x
        z = sample_latent(self.vae.encode(x).latent_dist, generator)
        z = z.squeeze(2) if self._video_vae() else z
        shift, scale = self._latent_stats(z)
        return ((z - shift) * scale).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        home = next(self.vae.parameters()).device
        if home != self.device:
            nn.Module.to(self.vae, self.device)
        try:
            shift, scale = self._latent_stats(latents)
            z = (latents.float() / scale + shift).to(self.device, self.dtype)
            z = z.unsqueeze(2) if self._video_vae() else z
            pixels = self.vae.decode(z).sample
            pixels = pixels.squeeze(2) if self._video_vae() else pixels
        finally:
            if home != self.device:
                nn.Module.to(self.vae, home)
        return pixels.float().clamp(-1, 1)

    # -- denoiser -------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity ε − x₀ (float32) at σ = ``timesteps`` (float) or ``timesteps``/1000 (integer)."""
        sigma = timesteps.float() if timesteps.is_floating_point() else timesteps.float() / 1000
        sigma = sigma.to(self.device).expand(noisy.shape[0])
        x = noisy.to(self.device, self.dtype)
        context = cond.context.to(self.device, self.dtype)
        if self.family is Family.ZIMAGE:
            mask = cond.mask if cond.mask is not None else torch.ones(context.shape[:2], dtype=torch.bool)
            caps = [context[i][mask[i].to(self.device)] for i in range(x.shape[0])]
            out = self.unet(list(x.unsqueeze(2)), (1 - sigma).to(self.dtype), caps, return_dict=False)[0]
            return -torch.stack([o.float() for o in out]).squeeze(2)
        # Cosmos concatenates an all-zero padding-mask channel (full images are never padded)
        pad = torch.zeros((1, 1, *x.shape[-2:]), device=self.device, dtype=self.dtype)
        pad = pad if self.unet.config.concat_padding_mask else None
        out = self.unet(x.unsqueeze(2), sigma.to(self.dtype), context, padding_mask=pad, return_dict=False)[0]
        return out.float().squeeze(2)

    def set_compile(self, enabled: bool) -> str | None:
        return "train_compile is not supported with patched adapters yet; training uncompiled" if enabled else None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant checkpointing of the transformer blocks (diffusers' own switch)."""
        from trainer.models.diffusers_runtime import _checkpoint_non_reentrant

        if enabled:
            self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_non_reentrant)
        else:
            self.unet.disable_gradient_checkpointing()
            self.unet.eval()

    def offload(self, *parts: str) -> None:
        for part in parts:
            if part == "vae":
                self.vae.to("cpu")
            elif part == "text_encoders":
                for module in (self.text_encoder, self.adapter):
                    if module is not None:
                        module.to("cpu")
            else:
                raise ValueError(f"unknown part '{part}' (vae, text_encoders)")
