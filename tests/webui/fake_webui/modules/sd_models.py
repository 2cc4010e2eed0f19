"""Fake ``modules.sd_models``: a checkpoint list whose entries build fake models on demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from modules import shared


@dataclass
class CheckpointInfo:
    title: str
    filename: str
    name: str = ""
    factory: Callable[[], object] | None = field(default=None, repr=False)


checkpoints_list: dict[str, CheckpointInfo] = {}
loads: list[str] = []


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return list(checkpoints_list)


def match_in(listed: dict[str, CheckpointInfo], search: str) -> CheckpointInfo | None:
    """A1111's lookup: an exact title, else the first title containing ``search``."""
    if search in listed:
        return listed[search]
    hits = [info for title, info in listed.items() if search in title]
    return hits[0] if hits else None


def get_closet_checkpoint_match(search: str) -> CheckpointInfo | None:
    return match_in(checkpoints_list, search)


def reload_model_weights(sd_model=None, info: CheckpointInfo | None = None, forced_reload: bool = False):
    """Build (or reuse) the model of ``info`` and make it the loaded one; no ``info``: the one the settings
    name, and nothing happens when it is already loaded (as A1111)."""
    if info is None:
        info = checkpoints_list.get(shared.opts.sd_model_checkpoint)
        current = getattr(shared.sd_model, "sd_checkpoint_info", None)
        if info is None or info is current:
            return shared.sd_model
    loads.append(info.title)
    model = info.factory()
    model.sd_checkpoint_info = info
    shared.sd_model = model
    shared.opts.sd_model_checkpoint = info.title
    return model
