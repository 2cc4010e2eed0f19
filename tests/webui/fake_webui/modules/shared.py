"""Fake ``modules.shared``: the loaded model, options, command-line options and the job state."""

from __future__ import annotations

from types import SimpleNamespace


class State:
    """Records what the trainer does with A1111's ``shared.state``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.events: list[str] = []

    def begin(self, job: str = "(unknown)") -> None:
        self.job = job
        self.events.append(f"begin:{job}")

    def end(self) -> None:
        self.events.append("end")
        self.job = ""


sd_model = None
opts = SimpleNamespace(sd_model_checkpoint="", CLIP_stop_at_last_layers=1)
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, lora_dir="")
state = State()


def reset() -> None:
    """Back to a fresh Web-UI (tests call this between cases)."""
    global sd_model
    sd_model = None
    opts.sd_model_checkpoint = ""
    cmd_opts.lowvram = cmd_opts.medvram = cmd_opts.medvram_sdxl = False
    cmd_opts.lora_dir = ""
    state.reset()
