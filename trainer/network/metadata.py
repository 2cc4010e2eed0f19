"""LoRA file metadata (kohya ``ss_*``, SAI ``modelspec.*``, our ``traintrain_*``) and A1111's sidecar card.

Pure builders: values in, ``dict[str, str]`` out. ``sshs_*`` hashes depend on the tensors and are added
by :func:`trainer.network.kohya_io.save_lora`.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.paths import atomic_write_text

_ARCHITECTURE = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
    ("zimage", False): "Z-Image",  # OneTrainer's z_image-lora spec
    ("anima", False): "anima-preview",  # kohya's sai_model_spec (ARCH_ANIMA_PREVIEW)
}
_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models", "zimage": "https://github.com/huggingface/diffusers",
                   "anima": "https://huggingface.co/circlestone-labs/Anima"}
_SIDECAR_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "zimage": "Z-Image", "anima": "Anima"}
_LYCORIS_ALGO = {"loha": "loha", "lokr": "lokr", "dora": "locon"}


def _family(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


def base_model_version(family: Any, v_pred: bool) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1``, ``sd_v2``, ``sd_v2_v`` or ``sdxl_base_v1-0``."""
    fam = _family(family)
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "zimage": "zimage", "anima": "anima"}[fam]
    return version + "_v" if fam == "sd2" and v_pred else version


def network_module_and_args(network_type: str, conv_rank: int, conv_alpha: float) -> tuple[str, dict[str, str]]:
    """(``ss_network_module``, ``ss_network_args``) as kohya/LyCORIS write them (args values are strings)."""
    if network_type == "lierla":
        return "networks.lora", {}
    conv = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha))}
    if network_type == "c3lier":
        return "networks.lora", conv
    args = {"algo": _LYCORIS_ALGO.get(network_type, network_type), **conv}
    if network_type == "dora":
        args["dora_wd"] = "True"
    return "lycoris.kohya", args


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list, tuple)) else str(value)


def build_metadata(*, settings: Any = None, network: Any = None, bundle: Any = None, **fields: Any) -> dict[str, str]:
    """Build the metadata of one saved LoRA, from explicit fields or from a run's objects.

    Two call forms:
      * ``build_metadata(family=..., v_pred=..., network_type=..., ...)``: see :func:`build_metadata_fields`.
      * ``build_metadata(settings=s, network=net, bundle=b, output_name=..., steps=..., seed=...,
        started_at=..., resolution=(width, height), extra={...}, tag_frequency=...)``: see
        :func:`metadata_from_run`.

    Returns:
        Metadata with every value a string.
    """
    if settings is not None:
        return metadata_from_run(settings=settings, network=network, bundle=bundle, **fields)
    return build_metadata_fields(**fields)


def metadata_from_run(
    *,
    settings: Any,
    network: Any,
    bundle: Any,
    output_name: str,
    steps: int,
    started_at: float,
    resolution: tuple[int, int],
    seed: int | None = None,
    finished_at: float | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    num_train_images: int = 0,
    extra: Mapping[str, Any] | None = None,
    mixed_precision: str | None = None,
) -> dict[str, str]:
    """Metadata from the settings, the network (its spec: ranks of a resumed file win) and the bundle.

    Args:
        settings: a ``Settings`` value (``train_*`` fields are read by name).
        network: the saved ``Network`` (``network.spec``).
        bundle: the ModelBundle (``family``, ``v_pred``, ``name``).
        output_name: file stem including suffixes.
        steps: steps trained so far.
        started_at: Unix time the job started.
        resolution: (width, height) in pixels.
        seed, finished_at, tag_frequency, num_train_images, extra: as in :func:`build_metadata_fields`.
        mixed_precision: the autocast mode the run used (``fp16``/``bf16``/``no``); None reads it from
            ``train_model_precision`` (fp32 → ``no``; model/int8 load half weights → ``fp16``).

    The bundle's ``clip_skip`` (SD1/SD2) and ``zero_snr`` become ``ss_clip_skip`` and ``ss_zero_terminal_snr``.
    """
    spec = network.spec

    def get(name: str, default: Any = None) -> Any:
        value = getattr(settings, name, default)
        return default if value is None else value

    width, height = resolution
    lr = get("train_learning_rate")
    return build_metadata_fields(
        family=bundle.family,
        v_pred=bool(bundle.v_pred),
        network_type=spec.network_type,
        rank=spec.rank,
        alpha=spec.alpha,
        conv_rank=spec.conv_rank,
        conv_alpha=spec.conv_alpha,
        output_name=output_name,
        model_name=str(getattr(bundle, "name", "")),
        image_size_hw=(height, width),
        training_started_at=started_at,
        training_finished_at=finished_at if finished_at is not None else time.time(),
        learning_rate=lr,
        unet_lr=lr,
        text_encoder_lr=get("train_textencoder_learning_rate") or lr,
        optimizer=str(get("train_optimizer", "")).lower(),
        lr_scheduler=str(get("train_lr_scheduler", "")),
        lr_warmup_steps=int(get("train_lr_warmup_steps", 0) or 0),
        max_train_steps=int(get("train_iterations", 0) or 0),
        steps=steps,
        seed=seed if seed is not None else get("train_seed"),
        min_snr_gamma=get("train_snr_gamma"),
        mixed_precision=mixed_precision if mixed_precision is not None else _autocast_mode(get("train_model_precision", "")),
        num_train_images=num_train_images,
        batch_size=int(get("train_batch_size", 1) or 1),
        tag_frequency=tag_frequency,
        timestep_range=(int(get("train_min_timesteps", 0) or 0), int(get("train_max_timesteps", 1000) or 1000)),
        clip_skip=getattr(bundle, "clip_skip", None),
        zero_terminal_snr=bool(getattr(bundle, "zero_snr", False)),
        extra=extra,
    )


def _autocast_mode(model_precision: str) -> str:
    """kohya's ``mixed_precision`` value for a ``train_model_precision`` choice (no device known)."""
    key = str(model_precision).lower()
    if key in ("bf16", "bfloat16"):
        return "bf16"
    return "fp16" if key in ("fp16", "float16", "model", "int8") else "no"


def build_metadata_fields(
    *,
    family: Any,
    v_pred: bool,
    network_type: str,
    rank: int,
    alpha: float,
    output_name: str,
    model_name: str,
    image_size_hw: tuple[int, int],
    training_started_at: float,
    conv_rank: int = 0,
    conv_alpha: float = 0.0,
    training_finished_at: float | None = None,
    learning_rate: float | None = None,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    optimizer: str = "",
    lr_scheduler: str = "",
    lr_warmup_steps: int = 0,
    max_train_steps: int = 0,
    steps: int = 0,
    seed: int | None = None,
    min_snr_gamma: float | None = None,
    mixed_precision: str = "",
    num_train_images: int = 0,
    batch_size: int = 1,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    session_id: int | None = None,
    clip_skip: int | None = None,
    zero_terminal_snr: bool | None = None,
    timestep_range: tuple[int, int] = (0, 1000),
    sd_model_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The pure metadata builder (ecosystem.md §4.4 item 2).

    Args:
        family: ``Family`` or ``"sd1"``/``"sd2"``/``"sdxl"``.
        v_pred: v-prediction model (SD2-v gets ``sd_v2_v`` and the ``768-v`` architecture).
        network_type: ``lierla``, ``c3lier``, ``loha`` (``lokr``, ``dora``).
        rank, alpha: linear rank and alpha (alpha 0 → rank); conv_rank/conv_alpha 0 → the linear values.
        output_name: file stem including suffixes (``my_lora_copy_500steps``).
        model_name: the base model's name (``ss_sd_model_name``).
        image_size_hw: training resolution as (height, width); written kohya-style as ``(width, height)``.
        training_started_at, training_finished_at: Unix times.
        learning_rate, unet_lr, text_encoder_lr: rates (None → not written).
        optimizer, lr_scheduler, lr_warmup_steps, max_train_steps, steps, seed, min_snr_gamma,
            mixed_precision, num_train_images, batch_size: written as kohya's ``ss_*`` of the same meaning
            (``mixed_precision``: the autocast mode, ``fp16``/``bf16``/``no``).
        tag_frequency: ``{dir: {tag: count}}`` for ``ss_tag_frequency`` (A1111's tag chips).
        session_id: kohya's random session id; drawn when None.
        clip_skip: ``ss_clip_skip`` / ``modelspec.encoder_layer`` when given (kohya: 1 = last layer).
        zero_terminal_snr: ``ss_zero_terminal_snr`` when given.
        timestep_range: ``modelspec.timestep_range``.
        sd_model_hash: sha256 of the base model (``ss_new_sd_model_hash``) when known.
        extra: mode details, written as ``traintrain_<key>`` (dicts/lists as JSON).

    Returns:
        Metadata with every value a string.
    """
    fam = _family(family)
    alpha = float(alpha) or float(rank)
    conv_rank = conv_rank or rank
    conv_alpha = float(conv_alpha) or alpha
    module, args = network_module_and_args(network_type, conv_rank, conv_alpha)
    height, width = image_size_hw
    finished = training_finished_at if training_finished_at is not None else training_started_at
    meta: dict[str, Any] = {
        "ss_session_id": session_id if session_id is not None else random.randint(0, 2**32),  # noqa: S311 (not secret)
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": finished,
        "ss_output_name": output_name,
        "ss_sd_model_name": model_name,
        "ss_base_model_version": base_model_version(fam, v_pred),
        "ss_v2": str(fam == "sd2"),
        "ss_network_module": module,
        "ss_network_dim": int(rank),
        "ss_network_alpha": alpha,
        "ss_network_args": args,
        "ss_resolution": f"({width}, {height})",
        "ss_tag_frequency": {k: dict(v) for k, v in (tag_frequency or {}).items()},
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_steps": steps,
        "ss_mixed_precision": mixed_precision,
        "ss_num_train_images": num_train_images,
        "ss_batch_size_per_device": batch_size,
    }
    optional = {
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_seed": seed,
        "ss_min_snr_gamma": min_snr_gamma,
        "ss_clip_skip": clip_skip,
        "ss_zero_terminal_snr": None if zero_terminal_snr is None else str(bool(zero_terminal_snr)),
        "ss_new_sd_model_hash": sd_model_hash,
    }
    meta.update({k: v for k, v in optional.items() if v is not None})
    meta.update(_modelspec(fam, v_pred, output_name, width, height, finished, timestep_range, clip_skip))
    meta.update({(k if k.startswith("traintrain_") else f"traintrain_{k}"): v for k, v in (extra or {}).items()})
    return {k: _stringify(v) for k, v in meta.items()}


def _modelspec(
    fam: str, v_pred: bool, title: str, width: int, height: int, date_ts: float, timesteps: tuple[int, int], clip_skip: int | None
) -> dict[str, str]:
    """SAI ModelSpec 1.0.1 keys for a LoRA."""
    arch = _ARCHITECTURE[(fam, v_pred and fam == "sd2")]
    # kohya: SDXL LoRAs are in sgm layout, SD1/SD2 LoRAs in diffusers layout
    implementation = _IMPLEMENTATION.get(fam, "diffusers")
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": _iso(date_ts),
        "modelspec.prediction_type": "flow" if fam in ("zimage", "anima") else "v" if v_pred else "epsilon",
        "modelspec.timestep_range": f"{timesteps[0]},{timesteps[1]}",
    }
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return spec


def write_sidecar(
    lora_path: str | os.PathLike[str],
    activation_text: str = "",
    preferred_weight: float = 1.0,
    sd_version: Any = "Unknown",
    notes: str = "",
) -> Path:
    """Write A1111's user-metadata card ``<name>.json`` next to the LoRA, atomically.

    Keys the user edited in an existing card (``description``, ``negative text``, others) are kept.

    Args:
        lora_path: the ``.safetensors`` file.
        activation_text: the trigger words A1111 adds with the LoRA.
        preferred_weight: the weight A1111 uses in ``<lora:name:w>`` (e.g. -1 for an eraser).
        sd_version: ``Family``/``"sd1"``… or A1111's label (``SD1``, ``SD2``, ``SDXL``, ``Unknown``).
        notes: free text.

    Returns:
        The card's path.
    """
    card_path = Path(lora_path).with_suffix(".json")
    card: dict[str, Any] = {"description": "", "negative text": ""}
    if card_path.is_file():
        try:
            existing = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None  # an unreadable card is replaced, not merged
        if isinstance(existing, dict):
            card.update(existing)
    label = _SIDECAR_VERSION.get(_family(sd_version), str(getattr(sd_version, "value", sd_version)))
    card.update(
        {
            "sd version": label,
            "activation text": activation_text,
            "preferred weight": float(preferred_weight),
            "notes": notes,
        }
    )
    return atomic_write_text(card_path, json.dumps(card, ensure_ascii=False, indent=4))
