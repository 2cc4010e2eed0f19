"""Forge Neo's LoRA loading for Z-Image / Anima, as its files do it (our code, Neo's rules).

``backend/patcher/lora.py`` takes its key map from ``modules_forge/packages/comfy/lora.py``
``model_lora_keys_unet(kmodel)``:

* for every ``diffusion_model.<path>.weight`` of the KModel's state dict: ``lora_unet_<path, dots as _>`` and
  ``diffusion_model.<path>`` (both for the weight);
* when the model config's ``huggingface_repo`` names Lumina or Z-Image, ``z_image_to_diffusers`` adds
  diffusers names under ``diffusion_model.``, ``transformer.``, ``lycoris_`` and bare: ``…attention.to_q``/
  ``to_k``/``to_v`` → the fused ``attention.qkv`` weight narrowed at rows 0, dim, 2·dim (``dim`` from the
  model's ``config``), ``…attention.to_out.0`` → ``attention.out``, ``feed_forward.w1/2/3`` as they are; for
  ``layers`` (``n_layers``) and both refiners (``n_refiner_layers``).

``load_lora`` takes ``<name>.lora_up.weight``/``.lora_down.weight``/``.alpha`` for every mapped name and leaves
the rest unmatched; the loader logs "Loaded … with N keys … (skipped M keys)". Merging adds
``strength · alpha/rank · up @ down`` into the (narrowed) weight, in inference mode, on new Parameter objects
(the originals are kept as a backup and put back at the next load).
"""

from __future__ import annotations

import torch
from torch import nn


def model_lora_keys_unet(kmodel: nn.Module) -> dict:
    key_map: dict = {}
    for k in kmodel.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k
            key_map["diffusion_model." + path] = k
    repo = kmodel.config.huggingface_repo.lower()
    if "lumina" in repo or "z-image" in repo:
        for name, target in _z_image_to_diffusers(kmodel.diffusion_model.config).items():
            for prefix in ("diffusion_model.", "transformer.", ""):
                key_map[prefix + name] = target
            key_map["lycoris_" + name.replace(".", "_")] = target
    return key_map


def _z_image_to_diffusers(config: dict) -> dict:
    dim = config["dim"]
    out: dict = {}
    groups = (("layers", config["n_layers"]), ("context_refiner", config["n_refiner_layers"]),
              ("noise_refiner", config["n_refiner_layers"]))
    for group, count in groups:
        for i in range(count):
            block = f"{group}.{i}"
            qkv = f"diffusion_model.{block}.attention.qkv.weight"
            for j, part in enumerate(("to_q", "to_k", "to_v")):
                out[f"{block}.attention.{part}"] = (qkv, (0, j * dim, dim))
            out[f"{block}.attention.to_out.0"] = f"diffusion_model.{block}.attention.out.weight"
            for w in ("w1", "w2", "w3"):
                out[f"{block}.feed_forward.{w}"] = f"diffusion_model.{block}.feed_forward.{w}.weight"
    return out


def load_lora(lora: dict, to_load: dict) -> tuple[dict, dict]:
    """(patches by target, unmatched keys) as comfy's ``load_lora`` splits a LoRA file."""
    patches, loaded = {}, set()
    for name, target in to_load.items():
        up, down = f"{name}.lora_up.weight", f"{name}.lora_down.weight"
        if up not in lora:
            continue
        alpha = lora.get(f"{name}.alpha")
        patches[target] = (lora[up], lora[down], None if alpha is None else float(alpha))
        loaded.update({up, down} | ({f"{name}.alpha"} if alpha is not None else set()))
    return patches, {k: v for k, v in lora.items() if k not in loaded}


@torch.inference_mode()
def apply(kmodel: nn.Module, patches: dict, strength: float = 1.0) -> dict:
    """Merge ``patches`` into new Parameters of ``kmodel``; returns the backup of the replaced ones."""
    backup = {}
    for target, (up, down, alpha) in patches.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        owner_path, _, leaf = key.rpartition(".")
        owner = kmodel.get_submodule(owner_path)
        weight = backup.setdefault(key, getattr(owner, leaf))
        new = getattr(owner, leaf).detach().clone().float()
        scale = (alpha / down.shape[0]) if alpha is not None else 1.0
        delta = strength * scale * (up.float().flatten(1) @ down.float().flatten(1))
        view = new if offset is None else new.narrow(offset[0], offset[1], offset[2])
        view += delta.reshape(view.shape)
        owner._parameters[leaf] = nn.Parameter(new.to(weight.dtype), requires_grad=False)
    return backup


@torch.inference_mode()
def restore(kmodel: nn.Module, backup: dict) -> None:
    for key, weight in backup.items():
        owner_path, _, leaf = key.rpartition(".")
        kmodel.get_submodule(owner_path)._parameters[leaf] = weight
