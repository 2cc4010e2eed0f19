"""What a single-file checkpoint is: family (from its keys and shapes) and v-prediction.

Facts used (traintrain-behavior.md §7.6, §17 #54): the cross-attention context width of the U-Net is
768 (SD1), 1024 (SD2), 2048 (SDXL base) or 1280 (SDXL refiner); SDXL files keep their text encoders
under ``conditioner.embedders``; v-prediction files may carry a ``v_pred`` marker key; a plain SD2 file
is told apart by what its U-Net predicts for a flat input at t = 999.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.ldm import UNET_PREFIX

NOT_A_CHECKPOINT = (
    "is not a Stable Diffusion checkpoint (no 'model.diffusion_model.*' U-Net weights); "
    "choose an SD1, SD2 or SDXL model file or a diffusers folder (LoRA and VAE files go in their own fields)"
)
_CONTEXT_DIMS = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}


def context_dim(keys: Mapping[str, Any]) -> int | None:
    """Width of the first cross-attention key projection (``attn2.to_k``) of the U-Net, if any."""
    for key in sorted(keys):
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return int(keys[key].shape[1])
    return None


def detect_family(path: str, state: Mapping[str, Any], declared: str | None = None) -> Family:
    """The family of a single-file state dict (tensors or shape stubs).

    Args:
        path: the file, for messages.
        state: key -> tensor (only ``.shape`` is read).
        declared: ``traintrain.family`` from our own metadata, trusted for non-standard architectures.

    Raises:
        InputError: not a checkpoint, an SDXL refiner, or an unknown architecture.
    """
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise InputError(path, NOT_A_CHECKPOINT)
    dim = context_dim(state)
    refiner = dim == 1280 or (
        any(k.startswith("conditioner.embedders.0.model.") for k in state)
        and not any(k.startswith("conditioner.embedders.1.") for k in state)
    )
    if refiner:
        raise InputError(path, "SDXL refiner is not supported; choose an SDXL base, SD1 or SD2 checkpoint")
    if declared:
        try:
            return Family(declared)
        except ValueError as err:
            raise InputError(path, f"metadata names an unknown family '{declared}' (sd1, sd2 or sdxl)") from err
    if any(k.startswith("conditioner.embedders.") for k in state):
        return Family.SDXL
    if any(k.startswith("cond_stage_model.model.") for k in state):
        return Family.SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        return Family.SD1
    if dim in _CONTEXT_DIMS:
        return _CONTEXT_DIMS[dim]
    raise InputError(path, f"has a U-Net with context width {dim}, which is not SD1 (768), SD2 (1024) or SDXL (2048)")


def has_v_pred_marker(state: Mapping[str, Any]) -> bool:
    """True when the file carries a ``v_pred`` key (the convention of v-prediction SDXL/SD1 fine-tunes)."""
    return "v_pred" in state


@torch.no_grad()
def predicts_v(unet: nn.Module) -> bool:
    """Numeric v-prediction test for SD2 U-Nets.

    An epsilon model given a flat latent at the last timestep returns something close to the input
    (noise is all there is at t = 999); a v model returns roughly minus the clean image, so its output
    minus the input averages well below -1. A1111 uses the same probe (1x4x8x8 latent of 0.5, t = 999,
    a 2-token context of 0.5).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` with real weights.

    Returns:
        True for a v-prediction U-Net.
    """
    param = next(unet.parameters())
    device = param.device
    dim = int(unet.config.cross_attention_dim)
    x = torch.full((1, int(unet.config.in_channels), 8, 8), 0.5, device=device, dtype=param.dtype)
    context = torch.full((1, 2, dim), 0.5, device=device, dtype=param.dtype)
    out = unet(x, torch.tensor([999], device=device), encoder_hidden_states=context, return_dict=False)[0]
    return bool((out.float() - x.float()).mean().item() < -1.0)
