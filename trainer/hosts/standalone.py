"""The standalone host: models from folders (and the built-in tiny models), LoRAs into a folder."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.errors import InputError

BUILTIN_MODELS = ("tiny-sd1", "tiny-sd2v", "tiny-sdxl", "small-sd1", "sd15-random", "sdxl-random", "tiny-zimage",
                  "tiny-anima")
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".sft")


def pick_device(preference: str | None = None) -> torch.device:
    """cuda → mps → cpu, unless ``preference`` (or ``TRAINTRAIN_DEVICE``) names one (R20)."""
    choice = preference or os.environ.get("TRAINTRAIN_DEVICE", "")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Folders of other kinds that sit inside a models root: never scanned for checkpoints.
_OTHER_KINDS = {"lora", "lycoris", "vae", "embeddings", "hypernetworks", "controlnet", "esrgan", "upscale_models",
                "text_encoder", "text_encoders", "clip"}
# where Forge Neo (text_encoder), ComfyUI (text_encoders, formerly clip) keep text-encoder files
_TE_DIRS = ("text_encoder", "text_encoders", "clip")
# checkpoints: A1111/Forge (Stable-diffusion) or ComfyUI (checkpoints); ComfyUI keeps transformer-only files
# (Z-Image, Anima) in diffusion_models/ (formerly unet/), listed with that folder in their name
_CKPT_DIRS = ("Stable-diffusion", "StableDiffusion", "Stable-Diffusion", "checkpoints")
_DIT_DIRS = ("diffusion_models", "unet")


def _scan(root: Path) -> tuple[list[Path], list[Path]]:
    """(models, VAEs) under ``root``: single files and diffusers folders (``model_index.json``; their
    parts are not listed again) are models; ``*.vae.*`` files and diffusers VAE folders are VAEs."""
    models: list[Path] = []
    vaes: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and (here / "model_index.json").is_file():
            models.append(here)
            dirnames.clear()
            continue
        if here != root and (here / "config.json").is_file() and any(f.startswith("diffusion_pytorch_model") for f in filenames):
            vaes.append(here)  # a bare diffusers part: usable as a VAE folder
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _OTHER_KINDS)
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in CHECKPOINT_EXTS:
                continue
            (vaes if ".vae." in name.lower() else models).append(here / name)
    return models, vaes


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


class StandaloneHost:
    """Folders as the model store.

    Args:
        models_dir: root with ``Stable-diffusion``/``StableDiffusion``, ``VAE`` and ``Lora`` subfolders
            (or checkpoints directly inside it).
        lora_dir: output folder; defaults to ``<models_dir>/Lora`` or ``./output``.
        device: ``cuda``, ``cpu``, … (default: the best available).
    """

    name = "standalone"

    def __init__(self, models_dir: str | os.PathLike[str] | None = None, lora_dir: str | os.PathLike[str] | None = None,
                 device: str | None = None) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        root = self.models_dir
        default_lora = (_first_dir(root, ("Lora", "lora")) or root / "Lora") if root else Path.cwd() / "output"
        self._lora_dir = Path(lora_dir) if lora_dir else default_lora
        self.device = pick_device(device)
        self._cached: tuple[tuple, Any] | None = None
        self._last_model = ""

    # -- listing --------------------------------------------------------------------------------

    def _ckpt_dir(self) -> Path | None:
        if self.models_dir is None:
            return None
        return _first_dir(self.models_dir, _CKPT_DIRS) or self.models_dir

    def list_models(self) -> list[str]:
        """Single-file checkpoints and diffusers folders under the models folder, then the built-ins."""
        folder = self._ckpt_dir()
        found = _scan(folder)[0] if folder and folder.is_dir() else []
        names = [str(p.relative_to(folder)) for p in found]  # type: ignore[arg-type]
        if self.models_dir is not None and folder != self.models_dir:
            for name in _DIT_DIRS:
                extra = self.models_dir / name
                if extra.is_dir():
                    names += [str(p.relative_to(self.models_dir)) for p in _scan(extra)[0]]
        return names + list(BUILTIN_MODELS)

    def list_vaes(self) -> list[str]:
        """``""`` (the checkpoint's own), VAE files and diffusers VAE folders in ``VAE/``, then
        ``*.vae.*`` files beside the checkpoints (A1111's convention)."""
        vaes = [""]
        folder = _first_dir(self.models_dir, ("VAE", "vae")) if self.models_dir else None
        if folder:
            models, beside = _scan(folder)
            vaes += [str(p.relative_to(folder)) for p in sorted(models + beside)]
        ckpts = self._ckpt_dir()
        if ckpts and ckpts.is_dir() and ckpts != folder:
            vaes += [str(p.relative_to(ckpts)) for p in _scan(ckpts)[1]]
        return vaes

    def list_text_encoders(self) -> list[str]:
        """``""`` (the checkpoint's own), then the files in ``text_encoder/`` (Forge Neo) or ``text_encoders/``
        (ComfyUI): Z-Image's Qwen3 file is chosen here when its transformer is a separate file."""
        folder = _first_dir(self.models_dir, _TE_DIRS) if self.models_dir else None
        found = _scan(folder)[0] if folder else []
        return [""] + [str(p.relative_to(folder)) for p in found]  # type: ignore[arg-type]

    def default_model(self) -> str:
        return self._last_model or next(iter(self.list_models()), "tiny-sd1")

    def lora_dir(self) -> Path:
        self._lora_dir.mkdir(parents=True, exist_ok=True)
        return self._lora_dir

    def resolve(self, name: str, kind: str = "model") -> str:
        """A built-in name, an existing path, or a name relative to the models (or VAE) folder.

        Raises:
            InputError: nothing of that name exists.
        """
        if not name or (kind == "model" and name in BUILTIN_MODELS):
            return name
        if Path(name).exists():
            return str(Path(name))
        folders = [self._ckpt_dir()]
        if kind == "vae":  # VAEs live in VAE/, or beside the checkpoints as *.vae.*
            folders.insert(0, _first_dir(self.models_dir, ("VAE", "vae")) if self.models_dir else None)
        elif kind == "text encoder":
            folders.insert(0, _first_dir(self.models_dir, _TE_DIRS) if self.models_dir else None)
        if kind == "model":  # diffusion_models/<file> as listed
            folders.append(self.models_dir)
        for folder in folders:
            if folder and (folder / name).exists():
                return str(folder / name)
        raise InputError(name, f"no {kind} of that name; choose one from the list or give a full path")

    # -- training -------------------------------------------------------------------------------

    @contextmanager
    def acquire(self, model: str, vae: str, *, precision: str, v_pred: bool | None,
                use_ema: bool = False, text_encoder: str = "") -> Iterator[Any]:
        """Load the model (reusing the previous job's when it is the same) for one job.

        A failed load leaves nothing cached: the previous model is dropped before loading, and the
        error carries no frames that hold the half-loaded one.
        """
        from trainer.models.diffusers_runtime import load_bundle
        from trainer.modes.common import resolve_precision

        model_path = self.resolve(model or self.default_model())
        vae_path = self.resolve(vae, "vae") if vae and vae != "None" else None
        te_path = self.resolve(text_encoder, "text encoder") if text_encoder and text_encoder != "None" else None
        dtype = resolve_precision(precision, "fp32", self.device).model_dtype
        key = (model_path, vae_path, te_path, dtype, v_pred, precision == "int8", use_ema)
        if self._cached is None or self._cached[0] != key:
            self._cached = None
            gc.collect()
            # int8 is a storage dtype load_bundle understands (torchao weight-only), not a float precision
            bundle = load_bundle(model_path, vae_path, device=self.device,
                                 dtype=torch.int8 if precision == "int8" else dtype, v_pred=v_pred, use_ema=use_ema,
                                 text_encoder=te_path)
            self._cached = (key, bundle)
        self._last_model = model or self._last_model
        bundle = self._cached[1]
        try:
            yield bundle
        finally:
            from trainer.network import detach_all

            bundle.set_gradient_checkpointing(False)
            # a safety net: the modes detach their networks, and nothing may stay attached between jobs
            for root in (bundle.unet, *bundle.text_encoders.values()):
                detach_all(root)

    def on_saved(self, path: Path, sidecar: dict[str, Any] | None) -> None:
        if sidecar:
            from trainer.network import write_sidecar

            write_sidecar(path, **sidecar)

    def report(self, step: int, total: int, text: str) -> None:
        pass

    def interrupted(self) -> bool:
        return False
