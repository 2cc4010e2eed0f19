"""Reading and writing kohya-format LoRA files: atomic, finite-checked, with kohya's precomputed hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from trainer.errors import InputError, TrainTrainError
from trainer.paths import atomic_write_bytes

# safetensors' own error type (a ValueError subclass is not guaranteed across versions)
_SAFETENSORS_ERRORS = (getattr(safetensors, "SafetensorError", ValueError), ValueError, OSError)
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def tensor_data_sha256(data: bytes) -> str:
    """sha256 of the tensor-data region of a safetensors blob (after the 8-byte length and JSON header).

    This is kohya's ``sshs_model_hash``, A1111's "addnet hash" and Civitai's AutoV3.
    """
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def legacy_hash(data: bytes) -> str:
    """kohya's ``sshs_legacy_hash``: the first 8 hex digits of sha256 of 64 KiB at offset 1 MiB."""
    return hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def precalculate_hashes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) exactly as kohya computes them.

    kohya serialises the tensors with only the ``ss_*`` metadata, so later edits of user metadata
    cannot change the hashes, and hashes that buffer.
    """
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = _st_save(state_dict, training_only)
    return tensor_data_sha256(blob), legacy_hash(blob)


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Key of the first tensor holding NaN or inf, or None."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def save_lora(path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], metadata: dict[str, str], *,
              exclusive: bool = False) -> Path:
    """Write a LoRA file atomically, adding ``sshs_model_hash`` and ``sshs_legacy_hash``.

    Args:
        path: the ``.safetensors`` file to write (its folder is created).
        state_dict: kohya keys -> tensors (moved to CPU and made contiguous here).
        metadata: string keys and values (``build_metadata``); not modified.
        exclusive: never replace an existing file (``save_overwrite`` off), checked when the file is written.

    Returns:
        The written path.

    Raises:
        TrainTrainError: a tensor is NaN/inf (named); nothing is written.
        TypeError: a metadata value is not a string.
        FileExistsError: ``exclusive`` and the file exists; nothing was written.
    """
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise TrainTrainError(
            f"{path}: tensor '{bad}' holds NaN or inf, so the LoRA was not saved; training diverged — lower the "
            "learning rate or use fp32/bf16 precision"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata '{key}' must be a string, got {type(value).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    model_hash, legacy = precalculate_hashes(tensors, metadata)
    full = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    return atomic_write_bytes(path, _st_save(tensors, full), exclusive=exclusive)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file without loading its tensors.

    Raises:
        InputError: the file is missing or not a safetensors file.
    """
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as err:
        raise InputError(str(path), f"cannot read as safetensors: {err}") from err
    return dict(header.get("__metadata__", {}) or {})


def load_lora(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA file: (state dict on CPU, metadata).

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (kohya ``.pt``/``.ckpt`` LoRAs), which never runs pickled code.

    Raises:
        InputError: the file is missing or unreadable.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(str(path), "file not found; give the full path of a .safetensors LoRA")
    if file.suffix.lower() != ".safetensors":
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # code in the pickle (never run) or garbage
            raise InputError(str(path), "is not a LoRA that loads without running pickled code (which we never "
                                        "do); convert it to .safetensors") from err
        except (OSError, RuntimeError, ValueError, EOFError, IndexError, KeyError, TypeError) as err:
            reason = " ".join(str(err).split())[:200]
            raise InputError(str(path), f"cannot load ({type(err).__name__}: {reason}); choose a LoRA file") from err
        if not isinstance(state, dict):
            raise InputError(str(path), "holds no tensors by name; choose a LoRA file")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    data = file.read_bytes()
    try:
        state = _st_load(data)
    except _SAFETENSORS_ERRORS as err:
        raise InputError(str(path), f"not a valid safetensors file: {err}") from err
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    return state, dict(metadata)
