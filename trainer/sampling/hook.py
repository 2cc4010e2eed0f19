"""The preview hook the step loop calls: every ``sample_every_n_steps`` steps (and when the pass ends)
render each sample prompt, save it under ``logs/<day>/<run>/samples/`` and emit a ``PreviewEvent``.

Previews must not change what is trained: they run under ``no_grad`` inside ``fork_rng`` (CPU and the
training device), with their own generator per image, the adapters' multipliers and every module's
train/eval flag put back afterwards. For slider modes (iLECO, Difference pass 2, ADDifT, Multi-ADDifT)
each prompt becomes a strip at LoRA weight −1, 0, +1 on one seed, so the slider's movement is visible.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trainer.optim import averaged_weights
from trainer.progress import PreviewEvent
from trainer.sampling.prompts import SamplePrompt, parse_sample_prompts
from trainer.sampling.render import OwnLoopRenderer, Renderer

SLIDER_MODES = ("iLECO", "Difference", "ADDifT", "Multi-ADDifT")
STRIP = (-1.0, 0.0, 1.0)


def preview_multipliers(mode: str, pass_index: int) -> tuple[float, ...]:
    """LoRA weights of one preview: a −1/0/+1 strip for slider modes, weight 1 for LoRA and the copier.

    Difference pass 1 trains the copier, a plain LoRA of the Original image; pass 2's strip runs with
    the copier attached at 1, as in training, so weight 0 shows the copy and +1 the Target.
    """
    if mode in SLIDER_MODES and not (mode == "Difference" and pass_index == 1):
        return STRIP
    return (1.0,)


def default_prompt(s) -> SamplePrompt:
    """The prompt a user expects when ``sample_prompts`` is empty: what the LoRA is triggered by."""
    if s.mode == "iLECO":
        return SamplePrompt(s.original_prompt, negative=s.negative_prompt)
    if s.mode == "Difference":
        return SamplePrompt(s.original_prompt)
    if s.mode == "ADDifT":
        return SamplePrompt(s.target_prompt)
    return SamplePrompt(s.lora_trigger_word)


def resolve_prompts(s, seed: int) -> list[SamplePrompt]:
    """The sample prompts with sizes (the run's ``image_size``) and seed (the run's) filled in."""
    prompts = parse_sample_prompts(s.sample_prompts) if s.sample_prompts.strip() else [default_prompt(s)]
    height, width = (int(v) for v in s.image_size)
    return [replace(p, width=p.width or width, height=p.height or height, seed=seed if p.seed is None else p.seed)
            for p in prompts]


@contextlib.contextmanager
def isolated(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """No grad, forked torch/Python RNGs, eval mode; every train/eval flag comes back afterwards.

    Gradient checkpointing on older diffusers needs the U-Net in train mode, and a host sampler may
    draw from the global RNG: neither may leak into training.
    """
    flags = [(m, m.training) for root in modules for m in root.modules()]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for root in modules:
                root.eval()
            yield
    finally:
        random.setstate(py_state)
        for m, flag in flags:
            m.training = flag


class PreviewHook:
    """Called by the step loop after every step; renders on multiples of ``every`` and at the end.

    Args:
        ctx: the run context (bundle, events, precision, output plan).
        network: the network being trained (its multiplier makes the strip).
        prompts: resolved sample prompts.
        renderer: the host's renderer, or our own loop.
        folder: where the images go.
        stem: file-name prefix (the LoRA name, ``_copy`` for Difference pass 1).
        optimizer: the pass's optimizer (schedule-free ones are swapped to their averaged weights to render).
    """

    def __init__(self, ctx, s, network, *, prompts: list[SamplePrompt], renderer: Renderer, folder: Path, stem: str,
                 pass_index: int, total_steps: int, optimizer=None) -> None:
        self.ctx, self.network, self.prompts, self.renderer = ctx, network, prompts, renderer
        self.optimizer = optimizer
        self.folder, self.stem, self.pass_index, self.total = folder, stem, pass_index, total_steps
        self.every = int(s.sample_every_n_steps)
        self.sampler = str(s.sample_sampler)
        self.multipliers = preview_multipliers(s.mode, pass_index)
        self.rendered: set[int] = set()

    def __call__(self, step: int) -> None:
        if step % self.every == 0:
            self.render(step)

    def finish(self, steps: int) -> None:
        """The end-of-pass preview, when the pass ran to its end (a stop does not wait for one)."""
        if steps == self.total:
            self.render(steps)

    def render(self, step: int) -> list[Path]:
        """Render every prompt at ``step``; returns the files written."""
        if step in self.rendered:
            return []
        self.rendered.add(step)
        bundle = self.ctx.bundle
        modules = [self.network, bundle.unet, *bundle.text_encoders.values()]
        written = []
        with averaged_weights(self.optimizer):  # schedule-free: render what a save at this step would hold
            for k, prompt in enumerate(self.prompts):
                started = time.perf_counter()
                with isolated(modules, bundle.device):
                    images = [self._at(m, prompt) for m in self.multipliers]
                if any(image is None for image in images):  # the host returned nothing (its Interrupt)
                    self.ctx.events.info(f"preview {k} at step {step} skipped: the renderer returned no image")
                    continue
                path = self.folder / f"{self.stem}_{step:06d}_{k}.png"
                self.folder.mkdir(parents=True, exist_ok=True)
                strip(images).save(path)
                seconds = time.perf_counter() - started
                self.ctx.events.emit(PreviewEvent(str(path), step, self.pass_index, prompt.prompt, self.multipliers,
                                                  round(seconds / len(images), 3)))
                written.append(path)
        return written

    def _at(self, multiplier: float, prompt: SamplePrompt) -> Any:
        with self.network.scaled(multiplier):
            return self.renderer(prompt, self.sampler)


def strip(images: list[Any]) -> Any:
    """Images side by side, left to right (LoRA weight −1, 0, +1)."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    width, height = sum(i.width for i in images), max(i.height for i in images)
    out = Image.new("RGB", (width, height))
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


def build_preview_hook(ctx, s, network, *, pass_index: int, total_steps: int, optimizer=None) -> PreviewHook:
    """The hook for one pass: prompts resolved, renderer chosen (the host's if it offers one), folder planned.

    Args:
        optimizer: the pass's optimizer; a schedule-free one renders with its averaged weights, as saves do.

    Raises:
        SettingsError: (``sample_prompts``) a line that does not parse.
    """
    prompts = resolve_prompts(s, ctx.seed)
    make = getattr(ctx.bundle, "preview_renderer", None)
    renderer = make() if make is not None else None
    own = OwnLoopRenderer(ctx.bundle, ctx.precision.autocast)
    if renderer is None:
        renderer = own
    elif hasattr(renderer, "fallback"):  # a host renderer that cannot render this model falls back to ours
        renderer.fallback, renderer.note = own, ctx.note
    copier = s.mode == "Difference" and pass_index == 1
    folder = samples_folder(ctx.out)
    by = getattr(renderer, "name", "our loop")
    ctx.events.info(f"Previews every {s.sample_every_n_steps} steps: {len(prompts)} prompt(s), {s.sample_sampler} "
                    f"by {by}, into {folder}")
    return PreviewHook(ctx, s, network, prompts=prompts, renderer=renderer, folder=folder,
                       stem=ctx.out.name + ("_copy" if copier else ""), pass_index=pass_index, total_steps=total_steps,
                       optimizer=optimizer)


def samples_folder(out) -> Path:
    """``logs/<YYYYMMDD>/<name>-<stamp>/samples`` beside the run's CSV log; without a logs folder,
    ``<lora folder>/samples/<name>-<stamp>``."""
    from trainer.csvlog import samples_dir

    if out.samples_root is not None:
        return samples_dir(out.samples_root, out.name, out.stamp)
    return out.lora_dir / "samples" / f"{out.name}-{out.stamp}"
