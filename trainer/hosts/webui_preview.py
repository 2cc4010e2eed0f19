"""Previews inside A1111: its own txt2img path (``StableDiffusionProcessingTxt2Img`` + ``process_images``,
sampler by name) on the loaded model, whose modules carry our adapters while training runs.

The Web-UI is left exactly as it was: the cond caches (class-level lists A1111 fills in place) are
swapped for empty ones during the call, because the text encoder's adapters change between previews,
and put back after; ``shared.state``'s progress fields, the model's ``alphas_cumprod`` (A1111 swaps it
per generation) and ``params.txt`` (the last generation's parameters) are restored. Extra networks are
disabled (a ``<lora:…>`` in a sample prompt would merge into the weights being trained under), no
scripts run, nothing is saved to the outputs folder, and the generation lock TrainTrain already holds
is not taken again (``process_images`` does not take it; its callers do).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.errors import TrainTrainError

STATE_FIELDS = ("job", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo")


class A1111Renderer:
    """Renders one preview through A1111's ``process_images`` (a :class:`~trainer.sampling.render.Renderer`).

    Args:
        bundle: the :class:`~trainer.models.webui_runtime.WebUIBundle` being trained.
    """

    name = "the Web-UI's sampler"

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle
        # set by the preview hook: our own loop, for when the Web-UI cannot render this model, and where
        # to say so (once)
        self.fallback: Any = None
        self.note: Any = None
        self._noted = False

    def __call__(self, prompt: Any, sampler: str) -> Any:
        """Returns an RGB PIL image, or None when the Web-UI returned none (its Interrupt was pressed).

        Raises:
            TrainTrainError: the Web-UI swapped the model while rendering.
        """
        from modules import processing, shared

        model = shared.sd_model
        why = _checkpoint_mismatch(shared, model)
        if why is not None:
            if self.fallback is None:
                raise TrainTrainError(f"{why}; set sample_every_n_steps to 0")
            if self.note is not None and not self._noted:
                self.note(f"{why}; previews use TrainTrain's own sampler instead")
                self._noted = True
            return self.fallback(prompt, sampler)
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt.prompt, negative_prompt=prompt.negative, seed=int(prompt.seed), sampler_name=sampler,
            steps=int(prompt.steps), cfg_scale=float(prompt.cfg_scale), width=int(prompt.width),
            height=int(prompt.height), batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
        )
        p.disable_extra_networks = True  # a <lora:…> must not merge into the weights under training
        p.do_not_reload_embeddings = True
        p.scripts = None
        with _kept(shared, processing, model), self.bundle.onloaded():
            processed = processing.process_images(p)
        if shared.sd_model is not model:
            raise TrainTrainError("the Web-UI switched models while rendering a preview; set sample_every_n_steps to 0")
        images = list(getattr(processed, "images", None) or [])
        return images[0].convert("RGB") if images else None


def _checkpoint_mismatch(shared: Any, model: Any) -> str | None:
    """Why ``process_images`` cannot be used: it reloads the checkpoint the Web-UI's settings name, which
    must be the one trained (the tab may train another model, or the user may pick one meanwhile)."""
    info = getattr(model, "sd_checkpoint_info", None)
    wanted = getattr(shared.opts, "sd_model_checkpoint", None)
    names = {getattr(info, "title", None), getattr(info, "name", None)} - {None}
    if wanted and names and wanted not in names:
        return (f"the Web-UI's checkpoint setting ('{wanted}') is not the model being trained "
                f"('{getattr(info, 'title', '?')}'), and its sampler would load it")
    return None


@contextlib.contextmanager
def _kept(shared: Any, processing: Any, model: Any) -> Iterator[None]:
    """Empty cond caches during the call; caches, progress fields, ``alphas_cumprod`` and params.txt after."""
    cls = processing.StableDiffusionProcessing
    caches = {name: getattr(cls, name, None) for name in ("cached_c", "cached_uc")}
    contents = {name: list(value) for name, value in caches.items() if isinstance(value, list)}
    state = {name: getattr(shared.state, name) for name in STATE_FIELDS if hasattr(shared.state, name)}
    schedule = getattr(model, "alphas_cumprod", None)
    params = _params_file()
    saved_params = params.read_bytes() if params is not None and params.is_file() else None
    try:
        for name in caches:
            setattr(cls, name, [None, None])
        yield
    finally:
        for name, value in caches.items():
            if name in contents:
                value[:] = contents[name]  # the same list object, with its old contents
            setattr(cls, name, value)
        for name, value in state.items():
            setattr(shared.state, name, value)
        if schedule is not None and getattr(model, "alphas_cumprod", None) is not schedule:
            model.alphas_cumprod = schedule
        if params is not None:
            if saved_params is None:
                params.unlink(missing_ok=True)
            else:
                params.write_bytes(saved_params)


def _params_file() -> Path | None:
    """A1111 writes the last generation's parameters to ``<data_path>/params.txt``."""
    try:
        from modules import paths
    except ImportError:
        return None
    data = getattr(paths, "data_path", None)
    return Path(data) / "params.txt" if data else None
