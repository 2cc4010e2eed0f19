"""Training modes ("recipes"): each module exposes ``run(ctx) -> ModeOutcome`` and
``planned_suffixes(settings) -> list[str]`` (the file-name suffixes it will write)."""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModes(dict):
    """Mode name -> recipe module, imported on first use so the registry costs nothing to import."""

    _MODULES = {"LoRA": "lora", "iLECO": "ileco", "Difference": "difference", "ADDifT": "addift", "Multi-ADDifT": "multi_addift"}

    def __init__(self) -> None:
        super().__init__({name: None for name in self._MODULES})

    def __getitem__(self, name: str) -> ModuleType:
        module = super().__getitem__(name)
        if module is None:
            module = importlib.import_module(f"trainer.modes.{self._MODULES[name]}")
            self[name] = module
        return module


MODES = _LazyModes()
