"""The ``ModelBundle`` protocol: everything a training mode needs from a model, and nothing more.

Two runtimes implement it: the diffusers runtime (standalone, CLI, tests) and the Web-UI runtime
(A1111 ldm/sgm and Forge modules trained in place). Modes never branch on the family: SD1, SD2 (eps or
v) and SDXL differences live behind ``encode_prompts`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol, runtime_checkable

import torch
from torch import nn


class Family(str, Enum):
    """Model families we train."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    ZIMAGE = "zimage"  # flow-matching DiT (ZImageTransformer2DModel + Qwen3-4B)
    ANIMA = "anima"  # flow-matching DiT (Cosmos-Predict2 2B + LLM adapter + Qwen3-0.6B)

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version`` for eps models (v models of SD2 add ``_v``); the reference
        product writes ``zimage``, kohya's Anima trainer ``anima``."""
        return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "zimage": "zimage", "anima": "anima"}[self.value]

    @property
    def is_dit(self) -> bool:
        return self in (Family.ZIMAGE, Family.ANIMA)


@dataclass(frozen=True)
class UNetShape:
    """What the diffusers <-> ldm name map needs to know about a U-Net.

    Attributes:
        layers_per_block: resnets per down level (up levels have one more).
        up_has_attention: per up level (diffusers ``up_blocks`` order), whether it has attentions.
    """

    layers_per_block: int
    up_has_attention: tuple[bool, ...]


@dataclass(frozen=True)
class Cond:
    """Text conditioning for a batch.

    Attributes:
        context: cross-attention states, (B, T, D).
        pooled: SDXL pooled text embedding (B, P); None for SD1/SD2.
        size: SDXL size conditioning (B, 6): original (h, w), crop top-left (top, left), target (h, w) in
            pixels, per sample (kohya's ``original_size``/``crop_top_left``/``target_size``); None means
            an uncropped image of the latent's own size. Ignored by SD1/SD2.
        mask: (B, T) bool, True for real tokens: DiT families whose prompts have different lengths
            (Z-Image keeps only the real tokens); None where every token counts (CLIP).
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    size: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        size = None if self.size is None else self.size.to(device=device)  # pixel counts stay float32
        mask = None if self.mask is None else self.mask.to(device=device)
        return Cond(self.context.to(device=device, dtype=dtype), pooled, size=size, mask=mask)

    def with_size(self, size: torch.Tensor | None) -> Cond:
        """The same text conditioning for images of the given sizes (B, 6) (see ``size``)."""
        return replace(self, size=size)

    def repeat(self, n: int) -> Cond:
        """Repeat every row n times along the batch axis (row order kept: a a b b for n=2)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, 0)
        size = None if self.size is None else self.size.repeat_interleave(n, 0)
        mask = None if self.mask is None else self.mask.repeat_interleave(n, 0)
        return Cond(self.context.repeat_interleave(n, 0), pooled, size=size, mask=mask)

    def select(self, index: torch.Tensor | list[int]) -> Cond:
        pooled = None if self.pooled is None else self.pooled[index]
        size = None if self.size is None else self.size[index]
        mask = None if self.mask is None else self.mask[index]
        return replace(self, context=self.context[index], pooled=pooled, size=size, mask=mask)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Concatenate along the batch axis. Token lengths must match: encode prompts that are batched
        together in one ``encode_prompts`` call (long prompts give 77·k tokens). Sizes are kept only when
        every part has them."""
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])  # type: ignore[misc]
        sizes = [c.size for c in conds]
        size = torch.cat(sizes) if all(x is not None for x in sizes) else None  # type: ignore[arg-type]
        if conds[0].mask is None:
            return Cond(torch.cat([c.context for c in conds]), pooled, size=size)
        # masked (DiT) prompts of different calls may differ in length: pad to the longest
        longest = max(c.context.shape[1] for c in conds)
        context = torch.cat([torch.nn.functional.pad(c.context, (0, 0, 0, longest - c.context.shape[1])) for c in conds])
        mask = torch.cat([torch.nn.functional.pad(c.mask, (0, longest - c.mask.shape[1])) for c in conds])  # type: ignore[arg-type]
        return Cond(context, pooled, size=size, mask=mask)


@runtime_checkable
class ModelBundle(Protocol):
    """A loaded model ready for adapter training.

    Attributes:
        family: SD1, SD2 or SDXL.
        v_pred: True when the model predicts v (``model_v_pred`` or detected).
        layout: ``"diffusers"`` or ``"ldm"``: how module paths inside ``unet`` are named.
        unet_shape: layout facts for the name map.
        unet: the denoiser whose Linear/Conv2d modules receive adapters.
        text_encoders: kohya prefix -> text-encoder root whose module paths follow Hugging Face CLIP
            naming (``text_model.encoder.layers.N.self_attn.q_proj``). ``{"lora_te": te}`` for SD1/SD2,
            ``{"lora_te1": te1, "lora_te2": te2}`` for SDXL. May be empty when a host cannot train them.
        device: where training runs.
        dtype: dtype of the frozen weights.
        alphas_cumprod: (1000,) float32 on ``device``: the training noise schedule.
        name: model name for metadata (file stem or built-in name).
        vae_scale_factor: pixels per latent pixel (8).
    """

    family: Family
    v_pred: bool
    layout: str
    unet_shape: UNetShape
    unet: nn.Module
    text_encoders: dict[str, nn.Module]
    device: torch.device
    dtype: torch.dtype
    alphas_cumprod: torch.Tensor
    name: str
    vae_scale_factor: int

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Encode prompts exactly as inference does (gradients flow when TE adapters train)."""
        ...

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode (B, 3, H, W) pixels in [-1, 1] to scaled latents (B, C, H/8, W/8), float32.

        A latent *sample* is drawn with ``generator`` so results are reproducible without touching
        the global RNG.
        """
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Run the denoiser. SDXL size conditioning is ``cond.size``, else the pixel size of ``noisy``
        (latent x 8) as an uncropped image."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents (B, C, h, w) to pixels (B, 3, h·8, w·8) in [-1, 1], float32, without
        gradients; a VAE the mode offloaded is brought to the device for the call and put back after."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn non-reentrant activation checkpointing of the U-Net blocks on or off."""
        ...

    def offload(self, *parts: str) -> None:
        """Move parts that are no longer needed (``"vae"``, ``"text_encoders"``) off the device."""
        ...
