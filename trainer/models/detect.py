"""What a single-file checkpoint is: family (from its keys and shapes), v-prediction and zero-terminal SNR.

Facts used (traintrain-behavior.md §7.6, §17 #54): the cross-attention context width of the U-Net is
768 (SD1), 1024 (SD2), 2048 (SDXL base) or 1280 (SDXL refiner); SDXL files keep their text encoders
under ``conditioner.embedders``; a plain SD2 file is told apart by what its U-Net predicts for a flat
input at t = 999. Families we do not train are named from their keys: SD3 (``joint_blocks``), Flux
(``double_blocks``/``single_blocks``), inpainting (a 9-channel U-Net input), InstructPix2Pix (8).

Prediction markers, as the Web-UIs read them: a ``v_pred`` key (Forge, ComfyUI) and a ``ztsnr`` key
beside it (zero-terminal-SNR anime fine-tunes), ``modelspec.prediction_type`` metadata, and A1111's
``<checkpoint>.yaml`` beside the file (``model.params.parameterization: "v"``, or an sgm
``VScaling`` denoiser). A1111 1.10 itself takes zero-SNR only from its "Noise schedule for sampling"
option; a yaml that names a zero-SNR discretization or a ``zero_terminal_snr``/``ztsnr`` flag is read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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
SUPPORTED = "supported are SD1, SD2 (eps or v) and SDXL base models (incl. Pony/Illustrious/NoobAI fine-tunes)"
_V_WORDS = {"v", "v_prediction", "v-prediction", "vpred", "v_pred"}
_EPS_WORDS = {"eps", "epsilon"}
_ZSNR_FLAGS = ("rescale_betas_zero_snr", "zero_terminal_snr", "ztsnr", "zsnr")


def _not_yet(path: str, what: str) -> InputError:
    return InputError(path, f"is {what}, which is not supported yet; {SUPPORTED}")


def refuse_unsupported(path: str, state: Mapping[str, Any]) -> None:
    """Name the family of a checkpoint we cannot train, from its keys and shapes (never the file name).

    Raises:
        InputError: an SD3/Flux/other-DiT, inpainting/InstructPix2Pix, a LoRA or a bare diffusers part.
    """
    from trainer.models.dit_loading import refuse_dit_file

    refuse_dit_file(path, state)  # flow DiTs first: Z-Image/Anima named with their fix, others "next release"
    keys = list(state)
    bare = [k.removeprefix(UNET_PREFIX) for k in keys]
    if any(k.startswith("joint_blocks.") for k in bare):
        raise _not_yet(path, "an SD3/SD3.5 checkpoint (MMDiT 'joint_blocks' detected)")
    if any(k.startswith("double_blocks.") for k in bare) and any(k.startswith("single_blocks.") for k in bare):
        raise _not_yet(path, "a Flux checkpoint ('double_blocks'/'single_blocks' detected)")
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) for k in keys):
        raise InputError(path, "is a LoRA, not a model; choose it in a LoRA field, and an SD1/SD2/SDXL checkpoint here")
    if not any(k.startswith(UNET_PREFIX) for k in keys) and "conv_in.weight" in state:
        raise InputError(path, "is a bare diffusers U-Net file (no text encoders or VAE); choose the whole "
                               "diffusers folder (with model_index.json) or a full single-file checkpoint")
    first = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    channels = int(first.shape[1]) if first is not None and len(first.shape) == 4 else 4
    if channels == 9:
        raise _not_yet(path, "an inpainting checkpoint (its U-Net takes 9 input channels)")
    if channels == 8:
        raise _not_yet(path, "an InstructPix2Pix checkpoint (its U-Net takes 8 input channels)")
    if channels != 4:
        raise _not_yet(path, f"a checkpoint whose U-Net takes {channels} input channels (4 expected)")


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
    refuse_unsupported(path, state)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise InputError(path, NOT_A_CHECKPOINT)
    dim = context_dim(state)
    refiner = dim == 1280 or (
        any(k.startswith("conditioner.embedders.0.model.") for k in state)
        and not any(k.startswith("conditioner.embedders.1.") for k in state)
    )
    if refiner:
        raise _not_yet(path, "an SDXL refiner (a 1280-wide context and one OpenCLIP encoder)")
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


@dataclass(frozen=True)
class Prediction:
    """What a checkpoint says about its target and schedule; None = it does not say.

    Attributes:
        v_pred: v-prediction (True), epsilon (False) or unknown (None).
        zero_snr: zero-terminal-SNR schedule, or None when nothing says so.
        source: where ``v_pred``/``zero_snr`` came from, for the user's notes.
    """

    v_pred: bool | None = None
    zero_snr: bool | None = None
    source: str = ""


def yaml_beside(path: str) -> Path | None:
    """A1111's per-checkpoint config: ``<stem>.yaml`` next to the file, if there is one."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def prediction_from_yaml(path: Path) -> Prediction:
    """Read v-prediction / zero-SNR from an ldm or sgm ``.yaml`` config (A1111 uses the yaml that way).

    A yaml decides v-prediction either way (it is the config the Web-UI builds the model from).

    Raises:
        InputError: the yaml cannot be parsed (the message names it and the fix).
    """
    try:
        import yaml
    except ImportError as err:
        raise InputError(str(path), "reading a checkpoint's .yaml needs the 'pyyaml' package: pip install pyyaml") from err
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())[:160]
        raise InputError(str(path), f"cannot be read as a model config ({reason}); fix or remove it") from err
    params = _dig(config, "model", "params")
    if not isinstance(params, dict):
        raise InputError(str(path), "is not a Stable Diffusion model config (no model.params); fix or remove it")
    scaling = str(_dig(params, "denoiser_config", "params", "scaling_config", "target") or "")
    v_pred = str(params.get("parameterization", "")).lower() == "v" or scaling.endswith(("VScaling", "VScalingWithEDMcNoise"))
    zero = _yaml_says_zero_snr(config)
    return Prediction(v_pred, True if zero else None, f"{path.name}")


def _dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _yaml_says_zero_snr(tree: Any) -> bool:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in _ZSNR_FLAGS and value is True:
                return True
            if key == "target" and "ZeroSNR" in str(value):
                return True
            if _yaml_says_zero_snr(value):
                return True
    elif isinstance(tree, list):
        return any(_yaml_says_zero_snr(v) for v in tree)
    return False


def prediction_from_file(state: Mapping[str, Any], metadata: Mapping[str, str]) -> Prediction:
    """Marker keys (``v_pred``, ``ztsnr``) and metadata (``modelspec.prediction_type``, kohya's
    ``ss_zero_terminal_snr``) of a single file."""
    kind = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    v_pred, source = None, ""
    if "v_pred" in state:
        v_pred, source = True, "its 'v_pred' key"
    elif kind in _V_WORDS | _EPS_WORDS:
        v_pred, source = kind in _V_WORDS, f"modelspec.prediction_type '{kind}'"
    zero = "ztsnr" in state or str(metadata.get("ss_zero_terminal_snr", "")).lower() == "true"
    if zero:
        source = ", ".join(s for s in (source, "its 'ztsnr' key" if "ztsnr" in state else "ss_zero_terminal_snr") if s)
    return Prediction(v_pred, True if zero else None, source)


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
