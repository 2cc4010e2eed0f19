"""Full resume (R17): one state file per step/stop save (in the run's ``resume/`` folder) holds everything needed to continue a
run to the same result as an uninterrupted one: adapter weights (fp32), optimizer and schedule state,
the step, the noise generators and the data position.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from trainer.errors import InputError, SettingsError
from trainer.paths import atomic_write_bytes

STATE_VERSION = 1
# settings that define the network's shape or the data order: a resumed run must match them
SHAPE_KEYS = ("mode", "network_type", "network_rank", "network_alpha", "network_conv_rank", "network_conv_alpha",
              "network_blocks", "network_element", "train_batch_size", "train_iterations")


def state_path(lora_path: str | Path, folder: str | Path) -> Path:
    """``…/name_100steps.safetensors`` → ``folder/name_100steps.state.pt``."""
    return Path(folder) / (Path(lora_path).name.removesuffix(".safetensors") + ".state.pt")


def _describe(settings) -> dict[str, str]:
    return {key: str(getattr(settings, key)) for key in SHAPE_KEYS}


def save_state(path: Path, *, step: int, pass_index: int, settings, network, optimizer, schedule,
               generators: dict[int, torch.Generator], tracked: dict[str, Any],
               frozen: dict[str, Any] | None = None) -> Path:
    """Write the resume state atomically (torch.save into memory, then temp file + rename)."""
    state = {
        "version": STATE_VERSION,
        "step": step,
        "pass_index": pass_index,
        "settings": _describe(settings),
        "network": {k: v.detach().to("cpu", torch.float32) for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generators": {str(k): g.get_state() for k, g in generators.items()},
        "tracked": {name: obj.state_dict() for name, obj in tracked.items()},
        # networks that stay attached but do not train (Difference's copier in pass 2)
        "frozen": {name: {k: v.detach().to("cpu", torch.float32) for k, v in net.state_dict().items()}
                   for name, net in (frozen or {}).items()},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a state file (weights-only unpickling).

    Raises:
        InputError: the file is missing or not a TrainTrain state.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:  # weights_only refuses pickled code with RuntimeError
        raise InputError(str(path), f"is not a readable TrainTrain state file ({err}); choose a *.state.pt file") from err
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise InputError(str(path), "is not a TrainTrain state file; choose the *.state.pt saved beside a step LoRA")
    return state


def load_state(path: str | Path, settings, pass_index: int = 1) -> dict[str, Any]:
    """Read a state file and check it belongs to this run.

    Raises:
        InputError: the file is missing or not a TrainTrain state.
        SettingsError: ``train_resume_state``: a shape-defining setting differs (names both values).
    """
    state = read_state(path)
    saved, now = state["settings"], _describe(settings)
    diffs = [f"{k}: state {saved.get(k)!r} vs now {now[k]!r}" for k in SHAPE_KEYS if saved.get(k) != now[k]]
    if diffs:
        raise SettingsError("train_resume_state", "the state was saved with other settings (" + "; ".join(diffs)
                            + "); use the settings of the interrupted run")
    if state["pass_index"] != pass_index:
        raise SettingsError("train_resume_state", f"the state is from pass {state['pass_index']}, not pass {pass_index}")
    return state


def restore_state(state: dict[str, Any], *, network, optimizer, schedule, generators: dict[int, torch.Generator],
                  tracked: dict[str, Any]) -> int:
    """Put every saved part back in place; returns the step to continue after."""
    network.load_state_dict(state["network"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    for key, gen_state in state["generators"].items():
        if int(key) in generators:
            generators[int(key)].set_state(gen_state)
    for name, obj in tracked.items():
        obj.load_state_dict(state["tracked"][name])
    return int(state["step"])
