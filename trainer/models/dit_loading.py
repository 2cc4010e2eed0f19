"""Loading the flow DiT families offline, and naming the ones we do not train yet.

* A Z-Image diffusers folder (``model_index.json`` ``ZImagePipeline``: ``transformer/``, ``text_encoder/``
  Qwen3, ``tokenizer/``, ``vae/``, ``scheduler/``) loads with local files only.
* Single files: the Z-Image file set (transformer + Qwen3 + VAE files, as ComfyUI/Forge Neo users keep them)
  loads in ``dit_files.py``; a transformer file that reaches the SD loader (not ``.safetensors``) is named here.
* Anima loads as its single-file set (``anima_files.py``: our LLM adapter, diffusers' Cosmos DiT) or the built-in
  ``tiny-anima``; diffusers has no Anima pipeline (its LLM adapter is not in ``CosmosTransformer3DModel``), so an
  Anima diffusers folder is named and refused.
* Flux.1, Chroma, Qwen-Image, Lumina 2 and other flow DiTs: one line, "next release".

Nothing half-loaded survives a refusal: every check runs before the first weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.dit import DiTParts

NEXT_RELEASE = "flow-matching DiTs other than Z-Image and Anima come in the next release"
# pipeline class name markers of flow DiTs we name and refuse (ZImage and Anima are handled first)
_NEXT_PIPELINES = (("Flux", "a Flux model"), ("Chroma", "a Chroma model"), ("QwenImage", "a Qwen-Image model"),
                   ("Lumina", "a Lumina 2 model"), ("HunyuanImage", "a HunyuanImage model"), ("Sana", "a Sana model"))
TURBO_NOTE = ("Z-Image-Turbo is step-distilled: a LoRA trained on it directly wears the distillation away (blurry, "
              "washed-out samples after a few hundred steps); keep runs short with a low learning rate, or train on "
              "the base Z-Image (or with a de-distillation training adapter merged) and use the LoRA on Turbo")


def dit_pipeline(index: Mapping[str, Any]) -> str | None:
    """``"zimage"``, ``"anima"``, or None for a pipeline that is not a flow DiT we know.

    Raises:
        InputError: (no path yet: the caller re-raises with it) never; see :func:`refuse_next_release`.
    """
    name = str(index.get("_class_name", ""))
    if name.startswith("ZImage"):
        return "zimage"
    if name.startswith("Anima") or "Cosmos" in str(index.get("transformer", "")):
        return "anima"
    return None


def refuse_next_release(path: str, index: Mapping[str, Any]) -> None:
    """Raises InputError naming a flow DiT family we do not train yet (folder form)."""
    name = str(index.get("_class_name", ""))
    for marker, what in _NEXT_PIPELINES:
        if marker in name:
            raise InputError(path, f"is {what} ({name}), which is not supported yet; {NEXT_RELEASE}")


def refuse_dit_file(path: str, state: Mapping[str, Any]) -> None:
    """Name a single-file flow DiT from its keys (with or without ``model.diffusion_model.``/``net.``).

    Raises:
        InputError: a Z-Image transformer file (alone it lacks its text encoder; the file set is not
            loaded yet), Anima, or a next-release family.
    """
    bare = {k.removeprefix("model.diffusion_model.").removeprefix("net.") for k in state}
    if "context_refiner.0.attention.k_norm.weight" in bare:
        raise InputError(path, "is a Z-Image transformer file: load it as .safetensors with its text encoder (Qwen3-4B "
                               "file in the text_encoder field) and VAE (Flux ae.safetensors in the vae field), or "
                               "load the Z-Image diffusers folder")
    if any(k.startswith("llm_adapter.") for k in bare):
        raise InputError(path, "is an Anima transformer file: load it as .safetensors with its text encoder "
                               "(Qwen3-0.6B file in the text_encoder field) and VAE (qwen_image_vae.safetensors in "
                               "the vae field)")
    if any(k.startswith("transformer_blocks.") for k in bare) and any("img_mod" in k for k in bare):
        raise InputError(path, f"is a Qwen-Image checkpoint; {NEXT_RELEASE}")
    if any(k.startswith("distilled_guidance_layer.") for k in bare):
        raise InputError(path, f"is a Chroma checkpoint; {NEXT_RELEASE}")


def load_dit_folder(path: str, *, dtype: torch.dtype | None = None, vae: str = "") -> DiTParts:
    """Load a Z-Image diffusers folder with local files only.

    Raises:
        InputError: an Anima folder, a missing part (named), or a VAE whose latent channels do not fit.
    """
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    root = Path(path)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    if dit_pipeline(index) == "anima":
        raise InputError(path, "is an Anima folder; diffusers has no Anima pipeline (its LLM adapter), so Anima trains "
                               "inside Forge Neo's host only for now")
    for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        if not (root / part).is_dir():
            what = "its Qwen3 text encoder" if part == "text_encoder" else part
            raise InputError(path, f"is a Z-Image folder without {part}/ ({what}); complete the folder")
    vae_dir = Path(vae) if vae else root / "vae"
    transformer_cfg = json.loads((root / "transformer" / "config.json").read_text(encoding="utf-8"))
    vae_cfg = json.loads((vae_dir / "config.json").read_text(encoding="utf-8")) if vae_dir.is_dir() else {}
    channels = int(vae_cfg.get("latent_channels", vae_cfg.get("z_dim", 0)) or 0)
    if channels != int(transformer_cfg.get("in_channels", 16)):
        raise InputError(vae or str(vae_dir), f"has {channels or 'no'} latent channels but Z-Image needs "
                                              f"{transformer_cfg.get('in_channels', 16)} (the Flux VAE); choose that VAE")
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["torch_dtype"] = dtype
    transformer = ZImageTransformer2DModel.from_pretrained(root / "transformer", **kw)
    text_encoder = Qwen3Model.from_pretrained(root / "text_encoder", **kw)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    vae_model = AutoencoderKL.from_pretrained(vae_dir, **kw)
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    turbo = "turbo" in root.name.lower() or "turbo" in str(index.get("_name_or_path", "")).lower()
    return DiTParts(Family.ZIMAGE, transformer, text_encoder, tokenizer, vae_model, scheduler, root.name,
                    turbo=turbo, notes=[TURBO_NOTE] if turbo else [])


def save_dit_folder(parts: DiTParts, folder: str | Path) -> Path:
    """Write a Z-Image part set as a diffusers folder (tests, and exporting the built-in)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    parts.transformer.save_pretrained(root / "transformer")
    parts.text_encoder.save_pretrained(root / "text_encoder")
    parts.tokenizer.save_pretrained(root / "tokenizer")
    parts.vae.save_pretrained(root / "vae")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler), encoding="utf-8")
    index = {"_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return root
