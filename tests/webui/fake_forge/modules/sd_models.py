"""Fake Forge / Neo ``modules.sd_models``: the dropdown only records the selection
(``forge_loading_parameters``); ``forge_model_reload`` builds the model **under inference mode** when a
generation (or TrainTrain) asks for it, as ``modules/sd_models.py:311`` does in Neo."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "_a1111_fake_sd_models", Path(__file__).resolve().parents[2] / "fake_webui" / "modules" / "sd_models.py")
_a1111 = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _a1111  # dataclasses look their module up
_spec.loader.exec_module(_a1111)
CheckpointInfo = _a1111.CheckpointInfo  # the same list entries as A1111's; only loading differs
checkpoints_list: dict[str, CheckpointInfo] = {}
loads: list[str] = []


class SdModelData:
    def __init__(self) -> None:
        self.sd_model = None  # measured in Neo: None until the first generation after start
        self.forge_loading_parameters: dict = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, value) -> None:
        self.sd_model = value


model_data = SdModelData()


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return list(checkpoints_list)


def get_closet_checkpoint_match(search: str) -> CheckpointInfo | None:
    return _a1111.match_in(checkpoints_list, search)


def select(title: str) -> None:
    """What the checkpoint dropdown's change handler does in Forge: remember, load nothing."""
    model_data.forge_loading_parameters = {"checkpoint_info": checkpoints_list[title]}


@torch.inference_mode()
def forge_model_reload():
    current = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current:
        return model_data.sd_model, False
    model_data.sd_model = None
    info = model_data.forge_loading_parameters.get("checkpoint_info")
    if info is None:
        raise ValueError("Failed to find available model...")
    loads.append(info.title)
    model = info.factory()
    model.sd_checkpoint_info = info
    model_data.set_sd_model(model)
    model_data.forge_hash = current
    return model, True
