"""State-dict conversion between diffusers parts and the ldm/sgm single-file layout.

diffusers -> ldm is ours (the wheel has no such function): the U-Net through ``names.diffusers_to_ldm``,
the VAE, OpenAI CLIP and OpenCLIP maps below. ldm -> diffusers calls diffusers' own ``convert_ldm_*``
helpers, so a file we write loads exactly as diffusers (and A1111/Forge) read it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from trainer.models.bundle import Family, UNetShape
from trainer.models.names import diffusers_to_ldm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Per family: where each text encoder lives in a single file, and whether it is in OpenCLIP layout.
TE_PREFIXES: dict[Family, tuple[tuple[str, bool], ...]] = {
    Family.SD1: (("cond_stage_model.transformer.", False),),
    Family.SD2: (("cond_stage_model.model.", True),),
    Family.SDXL: (("conditioner.embedders.0.transformer.", False), ("conditioner.embedders.1.model.", True)),
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_shape(config: dict[str, Any]) -> UNetShape:
    """Layout facts of a diffusers U-Net config for the name map."""
    lpb = config["layers_per_block"]
    return UNetShape(lpb if isinstance(lpb, int) else int(lpb[0]),
                     tuple("CrossAttn" in t for t in config["up_block_types"]))


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers U-Net parameters -> ``model.diffusion_model.*`` keys."""
    shape = unet_shape(config)
    return {UNET_PREFIX + diffusers_to_ldm(k, shape): v for k, v in state.items()}


def _vae_key_to_ldm(key: str, num_up: int) -> str:
    """One diffusers AutoencoderKL key -> its ldm key (without ``first_stage_model.``)."""
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        return key  # quant_conv / post_quant_conv
    side, rest = m[1], m[2]
    for src, dst in _VAE_TOP.items():
        rest = re.sub(rf"^{src}\.", dst + ".", rest)
    rest = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda r: f"mid.block_{int(r[1]) + 1}.", rest)
    rest = re.sub(r"^mid_block\.attentions\.0\.", "mid.attn_1.", rest)
    if side == "encoder":
        rest = re.sub(r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", rest)
        rest = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", rest)
    else:  # ldm numbers decoder levels from the lowest resolution up: reversed
        rest = re.sub(r"^up_blocks\.(\d+)\.resnets\.", lambda r: f"up.{num_up - 1 - int(r[1])}.block.", rest)
        rest = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda r: f"up.{num_up - 1 - int(r[1])}.upsample.", rest)
    table = _VAE_ATTN if ".attn_1." in rest else _VAE_RESNET
    for src, dst in table.items():
        rest = rest.replace(f".{src}.", f".{dst}.")
    return f"{side}.{rest}"


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL parameters -> ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        ldm = _vae_key_to_ldm(key, num_up)
        if ".attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + ldm] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel parameters -> ``<prefix>text_model.*`` (always with the ``text_model.`` segment)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP parameters -> OpenCLIP layout (q|k|v concatenated, ``ln_final``, transposed projection)."""
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": flat["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": flat["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": flat["final_layer_norm.weight"],
        prefix + "ln_final.bias": flat["final_layer_norm.bias"],
    }
    if "text_projection.weight" in flat:
        out[prefix + "text_projection"] = flat["text_projection.weight"].T.contiguous()
    layers = sorted({int(m[1]) for k in flat if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([flat[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in _OPENCLIP_LAYER.items():
                out[f"{dst}{b}.{kind}"] = flat[f"{src}{a}.{kind}"]
    return out


def components_to_ldm(family: Family, unet: nn.Module, vae: nn.Module, tes: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The whole single-file state dict of a model."""
    out = unet_to_ldm(unet.state_dict(), dict(unet.config))
    out.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    for te, (prefix, is_open) in zip(tes, TE_PREFIXES[family], strict=True):
        state = te.state_dict()
        out.update(open_clip_to_ldm(state, prefix) if is_open else clip_to_ldm(state, prefix))
    return out


def unet_from_ldm(ckpt: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` -> diffusers U-Net keys (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint({k: v for k, v in ckpt.items() if k.startswith(UNET_PREFIX)}, config)


def vae_from_ldm(ckpt: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ldm VAE keys (bare, ``first_stage_model.`` or ``vae.``) -> diffusers AutoencoderKL keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(ckpt, config)


def te_from_ldm(ckpt: dict[str, torch.Tensor], prefix: str, is_open: bool, model: nn.Module) -> dict[str, torch.Tensor]:
    """One text encoder's keys -> HF CLIP keys with ``text_model.`` (layers beyond the model's are dropped:
    SD2 files hold 24 OpenCLIP blocks, the diffusers encoder uses 23)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    part = {k: v for k, v in ckpt.items() if k.startswith(prefix)}
    if is_open:
        state = convert_open_clip_checkpoint(model, part, prefix=prefix)
    else:
        state = {k: v for k, v in convert_ldm_clip_checkpoint(part, prefix).items() if not k.startswith(prefix)}
    num_layers = model.config.num_hidden_layers
    keep = {}
    for key, value in state.items():
        m = re.search(r"encoder\.layers\.(\d+)\.", key)
        if m and int(m[1]) >= num_layers:
            continue
        keep[key] = value
    if not hasattr(model, "text_projection"):
        keep.pop("text_projection.weight", None)  # SD2's OpenCLIP projection has no place in CLIPTextModel
    return keep
