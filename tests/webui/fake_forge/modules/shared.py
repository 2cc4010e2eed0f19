"""Fake Forge ``modules.shared``: ``sd_model`` is a property over ``sd_models.model_data`` (as in Forge
and Neo), which holds None until the first generation loads the selected checkpoint."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

_spec = importlib.util.spec_from_file_location(
    "_a1111_fake_shared", Path(__file__).resolve().parents[2] / "fake_webui" / "modules" / "shared.py")
_a1111 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_a1111)
State = _a1111.State

opts = SimpleNamespace(sd_model_checkpoint="", CLIP_stop_at_last_layers=1, temp_dir="")
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, lora_dir="")
state = State()


class _Shared(ModuleType):
    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


def reset() -> None:
    from modules import sd_models

    sd_models.model_data.__init__()
    opts.sd_model_checkpoint = ""
    opts.temp_dir = ""
    cmd_opts.lowvram = cmd_opts.medvram = cmd_opts.medvram_sdxl = False
    cmd_opts.lora_dir = ""
    state.reset()


sys.modules[__name__].__class__ = _Shared
