"""Reading and writing models on disk, fully offline.

- ``save_single_file``: an ldm/sgm-layout ``.safetensors`` that A1111, Forge and diffusers load; our
  own metadata (``traintrain.family``, ``traintrain.configs``) lets non-standard (tiny) architectures
  rebuild exactly.
- ``load_single_file`` / ``load_diffusers_folder`` / ``load_vae``: strict loading into models built on
  the meta device from the shipped configs (``configs/``) or the file's metadata. Nothing is guessed
  from the Hub and nothing loads non-strictly.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.components import (
    TE_SLOTS,
    Components,
    build_empty,
    build_unet,
    default_scheduler,
    fit_clip_keys,
    load_strict,
    read_config_dir,
    shipped_dir,
)
from trainer.models.detect import NOT_A_CHECKPOINT, detect_family, has_v_pred_marker, predicts_v
from trainer.models.ldm import TE_PREFIXES, VAE_PREFIX, components_to_ldm, te_from_ldm, unet_from_ldm, vae_from_ldm

META_FAMILY = "traintrain.family"
META_CONFIGS = "traintrain.configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a ``.safetensors`` file (or a pickle-free ``.ckpt``/``.pt``) onto the CPU.

    Returns:
        (state dict, safetensors metadata; empty for pickles).

    Raises:
        InputError: unreadable, not a tensor file, or a pickle that needs code to load.
    """
    path = str(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        return _read_pickle(path), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(path, f"{NOT_A_CHECKPOINT} (cannot be read as safetensors: {err})") from err


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(path, "is not a tensor file that loads without running pickled code (which we never do); "
                               "choose a .safetensors checkpoint or convert this one to .safetensors") from err
    except (RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError, TypeError, struct.error) as err:
        # the safe unpickler reports text or random bytes with IndexError/KeyError ("pop from empty list")
        reason = " ".join(str(err).split())[:200]  # one line: torch's messages span several
        raise InputError(path, f"{NOT_A_CHECKPOINT} (cannot be read: {type(err).__name__}: {reason})") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise InputError(path, NOT_A_CHECKPOINT)
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _atomic_save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` to a temp file in the same folder, fsync, rename (never half-written)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_single_file(components: Components, path: str | os.PathLike[str], family: Family | None = None) -> Path:
    """Write a model as one ldm/sgm-layout ``.safetensors`` file (atomically).

    Args:
        components: the model (e.g. ``bundle.components`` or ``build_builtin(...)``).
        path: target file.
        family: defaults to ``components.family``.

    Returns:
        The written path.
    """
    family = family or components.family
    state = components_to_ldm(family, components.unet, components.vae, components.text_encoders)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if components.v_pred:
        state["v_pred"] = torch.tensor([])  # the marker v-prediction fine-tunes carry; read by A1111/Forge too
    configs: dict[str, Any] = {**components.configs(), "scheduler": components.scheduler}
    metadata = {META_FAMILY: family.value, META_CONFIGS: json.dumps(configs), "traintrain.name": components.name}
    target = Path(path)
    _atomic_save(state, target, metadata)
    return target


def save_diffusers_folder(components: Components, folder: str | os.PathLike[str]) -> Path:
    """Write a model as a diffusers folder (``save_pretrained`` of each part + model_index + scheduler)."""
    root = Path(folder)
    components.unet.save_pretrained(root / "unet")
    components.vae.save_pretrained(root / "vae")
    for slot, te in zip(TE_SLOTS, components.text_encoders, strict=False):
        te.save_pretrained(root / slot)
    sched = {"_class_name": "DDPMScheduler", **components.scheduler}
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
    pipe = "StableDiffusionXLPipeline" if components.family is Family.SDXL else "StableDiffusionPipeline"
    index = {"_class_name": pipe, "_traintrain_family": components.family.value,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    for slot, te in zip(TE_SLOTS, components.text_encoders, strict=False):
        index[slot] = ["transformers", type(te).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return root


def load_single_file(path: str) -> Components:
    """Load an SD1/SD2/SDXL single-file checkpoint (VAE may be absent: ``vae`` is then None).

    Raises:
        InputError: not a checkpoint, refiner, or weights that do not fit the detected architecture.
    """
    state, metadata = read_state_dict(path)
    own = json.loads(metadata[META_CONFIGS]) if META_CONFIGS in metadata else None
    family = detect_family(path, state, metadata.get(META_FAMILY) if own else None)
    configs = own or read_config_dir(shipped_dir(family))
    unet, vae, tes = build_empty(configs)
    _load_part(path, "U-Net", family, unet, unet_from_ldm, state, configs["unet"])
    has_vae = any(k.startswith(VAE_PREFIX) for k in state)
    if has_vae:
        _load_part(path, "VAE", family, vae, vae_from_ldm, state, configs["vae"])
    for te, (prefix, is_open) in zip(tes, TE_PREFIXES[family], strict=True):
        if not any(k.startswith(prefix) for k in state):
            raise InputError(path, f"has no text encoder weights under '{prefix}'; choose a complete {family.value} checkpoint")
        _load_part(path, "text encoder", family, te, _te_state, state, prefix, is_open, te)
    scheduler = (own or {}).get("scheduler") or configs.get("scheduler") or default_scheduler()
    if has_v_pred_marker(state):
        v_pred = True
    elif own is not None:
        v_pred = scheduler.get("prediction_type") == "v_prediction"
    else:
        v_pred = family is Family.SD2 and predicts_v(unet)
    if v_pred and family is Family.SD2 and own is None:
        unet = _rebuild_unet(read_config_dir(shipped_dir(family, v_pred=True))["unet"], unet)
    scheduler = {**default_scheduler(), **_schedule_keys(scheduler),
                 "prediction_type": "v_prediction" if v_pred else "epsilon"}
    return Components(family, unet, vae if has_vae else None, tes, v_pred=v_pred, scheduler=scheduler,
                      name=Path(path).stem, vae_config=configs["vae"])


def _schedule_keys(scheduler: dict[str, Any]) -> dict[str, Any]:
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")
    return {k: scheduler[k] for k in keys if k in scheduler}


def _rebuild_unet(config: dict[str, Any], loaded: nn.Module) -> nn.Module:
    """Same weights in a U-Net built from another config (SD2 768-v upcasts attention)."""
    with torch.device("meta"):
        unet = build_unet(config)
    load_strict(unet, dict(loaded.state_dict()))
    return unet


def _te_state(state: dict[str, torch.Tensor], prefix: str, is_open: bool, te: nn.Module) -> dict[str, torch.Tensor]:
    return fit_clip_keys(te_from_ldm(state, prefix, is_open, te), te)


def _load_part(path: str, what: str, family: Family, model: nn.Module, convert: Any, *args: Any) -> None:
    """Convert and strictly load one part; any mismatch becomes an InputError naming the part."""
    try:
        load_strict(model, convert(*args))
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        raise InputError(path, f"{what} weights do not fit the {family.value} architecture: {err}") from err


def load_diffusers_folder(path: str) -> Components:
    """Load a diffusers folder (``model_index.json`` with unet/vae/text_encoder[_2]/scheduler) offline.

    Raises:
        InputError: a part is missing or does not load.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(path)
    index_path = root / "model_index.json"
    if not index_path.is_file() or not (root / "unet").is_dir():
        raise InputError(path, "is not a diffusers model folder (needs model_index.json and unet/); "
                               "choose a .safetensors checkpoint or a diffusers folder")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    configs = read_config_dir(root)
    try:
        unet = _from_pretrained(UNet2DConditionModel, root / "unet")
        vae = _from_pretrained(AutoencoderKL, root / "vae")
        tes = [_from_pretrained(CLIPTextModelWithProjection if slot == "text_encoder_2" else CLIPTextModel, root / slot)
               for slot in TE_SLOTS if (root / slot).is_dir()]
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(path, f"a part of the diffusers folder does not load: {err}") from err
    family = _folder_family(index, configs)
    scheduler = {**default_scheduler(), **_schedule_keys(configs.get("scheduler", {}))}
    return Components(family, unet, vae, tes, v_pred=scheduler["prediction_type"] == "v_prediction",
                      scheduler=scheduler, name=root.name)


def _from_pretrained(cls: Any, folder: Path) -> nn.Module:
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except OSError:
        if any(folder.glob("*.fp16.safetensors")):  # Hub folders often carry only the fp16 variant
            return cls.from_pretrained(str(folder), local_files_only=True, variant="fp16")
        raise


def _folder_family(index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Family:
    if "_traintrain_family" in index:
        return Family(index["_traintrain_family"])
    if "text_encoder_2" in configs:
        return Family.SDXL
    return Family.SD2 if configs["text_encoder"].get("hidden_size") == 1024 else Family.SD1


def load_vae(path: str, config: dict[str, Any], family: Family) -> nn.Module:
    """Load a VAE file or diffusers VAE folder STRICTLY into the model's VAE architecture.

    Args:
        path: ``.safetensors``/``.pt`` in ldm (``encoder.down.0...``, optionally ``first_stage_model.``)
            or diffusers layout, or a folder with ``config.json``.
        config: the model's VAE config (the replacement must have exactly this architecture).
        family: for messages.

    Raises:
        InputError: not a VAE, or a VAE of another shape; the message names the ``vae`` field.
    """
    from diffusers import AutoencoderKL

    fix = f"choose a VAE made for {family.value} models, or leave vae empty to use the checkpoint's own"
    if os.path.isdir(path):
        weights = [p for p in Path(path).glob("*.safetensors")]
        if not weights:
            raise InputError(path, f"vae: the folder has no .safetensors weights; {fix}")
        state, _ = read_state_dict(str(weights[0]))
    else:
        state, _ = read_state_dict(path)
    if any(".down_blocks." in k for k in state):
        bare = {k.split("vae.", 1)[-1] if k.startswith("vae.") else k: v for k, v in state.items()}
    elif any(k.startswith(("encoder.down.", VAE_PREFIX + "encoder.down.")) for k in state):
        bare = vae_from_ldm(state, config)
    else:
        raise InputError(path, f"vae: is not a VAE file (no encoder/decoder weights); {fix}")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    try:
        load_strict(vae, bare)
    except ValueError as err:
        raise InputError(path, f"vae: does not fit this {family.value} model's VAE ({err}); {fix}") from err
    return vae
