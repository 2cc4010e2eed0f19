"""The one name map between diffusers and ldm/sgm (compvis) U-Net module paths, and block IDs.

Attention internals (``transformer_blocks.0.attn1.to_q``) are the same in both layouts; only the
block prefixes and the resnet sub-layer names differ. The map is general over ``layers_per_block``
(ldm numbering puts L resnets + 1 sampler per down level and L+1 layers per up level), so it serves
real SD1/SD2/SDXL U-Nets and the tiny test models alike.
"""

from __future__ import annotations

import re

from trainer.models.bundle import UNetShape

# diffusers resnet sub-layer -> ldm ResBlock sub-layer
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}

_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_TO_DIFFUSERS = {v: k for k, v in _TOP_TO_LDM.items()}


def _split(path: str, head: str) -> tuple[str, str] | None:
    if path == head:
        return head, ""
    if path.startswith(head + "."):
        return head, path[len(head) + 1 :]
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resnet_rest_to_ldm(rest: str) -> str:
    for src, dst in _RESNET_TO_LDM.items():
        hit = _split(rest, src)
        if hit:
            return _join(dst, hit[1])
    return rest


def _resnet_rest_to_diffusers(rest: str) -> str:
    for src, dst in _RESNET_TO_DIFFUSERS.items():
        hit = _split(rest, src)
        if hit:
            return _join(dst, hit[1])
    return rest


def diffusers_to_ldm(path: str, shape: UNetShape) -> str:
    """Map a diffusers U-Net module/parameter path to its ldm/sgm path.

    Args:
        path: e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``.
        shape: the U-Net's layout facts.

    Returns:
        e.g. ``input_blocks.4.1.transformer_blocks.0.attn2.to_k`` (for L = 2).

    Raises:
        KeyError: the path is not part of a U-Net we know.
    """
    per_down = shape.layers_per_block + 1
    for src, dst in _TOP_TO_LDM.items():
        hit = _split(path, src)
        if hit:
            return _join(dst, hit[1])
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "downsamplers":
            return _join(f"input_blocks.{(i + 1) * per_down}.0", rest.replace("conv", "op", 1) if rest.startswith("conv") else rest)
        n = 1 + i * per_down + j
        if kind == "resnets":
            return _join(f"input_blocks.{n}.0", _resnet_rest_to_ldm(rest))
        return _join(f"input_blocks.{n}.1", rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        if kind == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * j}", _resnet_rest_to_ldm(rest))
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "upsamplers":
            n = i * per_down + shape.layers_per_block
            slot = 2 if shape.up_has_attention[i] else 1
            return _join(f"output_blocks.{n}.{slot}", rest)
        n = i * per_down + j
        if kind == "resnets":
            return _join(f"output_blocks.{n}.0", _resnet_rest_to_ldm(rest))
        return _join(f"output_blocks.{n}.1", rest)
    raise KeyError(f"not a U-Net path: {path}")


def ldm_to_diffusers(path: str, shape: UNetShape) -> str:
    """Inverse of :func:`diffusers_to_ldm`.

    Raises:
        KeyError: the path is not part of a U-Net we know.
    """
    per_down = shape.layers_per_block + 1
    for src, dst in _TOP_TO_DIFFUSERS.items():
        hit = _split(path, src)
        if hit:
            return _join(dst, hit[1])
    m = re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, k, rest = int(m[1]), int(m[2]), m[3] or ""
        i, j = divmod(n - 1, per_down)
        if j == shape.layers_per_block:
            return _join(f"down_blocks.{i}.downsamplers.0", rest.replace("op", "conv", 1) if rest.startswith("op") else rest)
        if k == 0:
            return _join(f"down_blocks.{i}.resnets.{j}", _resnet_rest_to_diffusers(rest))
        return _join(f"down_blocks.{i}.attentions.{j}", rest)
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, rest = int(m[1]), m[2] or ""
        if k == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{k // 2}", _resnet_rest_to_diffusers(rest))
    m = re.match(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, k, rest = int(m[1]), int(m[2]), m[3] or ""
        i, j = divmod(n, per_down)
        if k == 0:
            return _join(f"up_blocks.{i}.resnets.{j}", _resnet_rest_to_diffusers(rest))
        if k == 1 and shape.up_has_attention[i]:
            return _join(f"up_blocks.{i}.attentions.{j}", rest)
        return _join(f"up_blocks.{i}.upsamplers.0", rest)
    raise KeyError(f"not a U-Net path: {path}")


def block_id(ldm_path: str) -> str:
    """The 26-block ID (``IN00``..``IN11``, ``M00``, ``OUT00``..``OUT11``) of an ldm U-Net path;
    ``BASE`` for anything outside the input/middle/output blocks (time embedding, conv_out)."""
    m = re.match(r"input_blocks\.(\d+)\.", ldm_path)
    if m:
        return f"IN{int(m[1]):02d}"
    if ldm_path.startswith("middle_block."):
        return "M00"
    m = re.match(r"output_blocks\.(\d+)\.", ldm_path)
    if m:
        return f"OUT{int(m[1]):02d}"
    return "BASE"


def kohya_name(prefix: str, path: str) -> str:
    """``lora_unet`` + ``input_blocks.4.1.proj_in`` -> ``lora_unet_input_blocks_4_1_proj_in``."""
    return f"{prefix}_{path.replace('.', '_')}"


def hf_clip_path(path: str) -> str:
    """Normalise a CLIP text-model module path to Hugging Face naming with the ``text_model.`` segment.

    transformers >= 5.6 flattened ``CLIPTextModel`` (paths start at ``encoder.``); A1111 and Forge
    only match kohya names that contain ``text_model_``, so we always put it back.
    """
    if path.startswith("text_model."):
        return path
    return "text_model." + path
