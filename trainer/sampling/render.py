"""Renderers: one preview image from one fully resolved prompt.

A renderer is any callable ``(prompt, sampler) -> PIL image``. A host may offer its own through
``bundle.preview_renderer()`` (A1111 renders with its own sampler path, ``trainer/hosts/webui_preview.py``);
everywhere else :class:`OwnLoopRenderer` runs our loop (``sampler.py``) on the bundle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from trainer.sampling.prompts import SamplePrompt
from trainer.sampling.sampler import sample_flow, sample_latents


class Renderer(Protocol):
    """Renders ``prompt`` (sizes and seed filled in) with the sampler named ``sampler``."""

    def __call__(self, prompt: SamplePrompt, sampler: str) -> Any: ...


def to_image(pixels: torch.Tensor) -> Any:
    """(3, H, W) in [-1, 1] -> an RGB PIL image."""
    from PIL import Image

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


class OwnLoopRenderer:
    """Our Euler/DDIM loop on ``bundle.predict`` and ``bundle.decode_latents``.

    Args:
        bundle: the loaded model (adapters attached as training has them).
        autocast: makes the autocast context training uses (fp16/bf16 frozen weights).
    """

    def __init__(self, bundle: Any, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.bundle = bundle
        self.autocast = autocast

    def __call__(self, prompt: SamplePrompt, sampler: str) -> Any:
        bundle = self.bundle
        assert prompt.width and prompt.height and prompt.seed is not None, "resolve the prompt first"
        conds = bundle.encode_prompts([prompt.negative, prompt.prompt])  # one call: equal token lengths
        uncond, cond = conds.select([0]), conds.select([1])
        f = bundle.vae_scale_factor
        shape = (1, getattr(bundle, "latent_channels", 4), prompt.height // f, prompt.width // f)
        # noise from a CPU generator: the same picture on every device, and no global RNG touched
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(prompt.seed % 2**63)).to(bundle.device)
        flow = getattr(bundle, "flow", None)
        if flow is not None:  # flow-matching families: Euler on σ with the family's shift at this size
            with self.autocast():
                latents = sample_flow(bundle.predict, cond, uncond, noise=noise, steps=prompt.steps,
                                      cfg_scale=prompt.cfg_scale, shift=lambda u: flow.apply(u, tuple(shape[-2:])))
            return to_image(bundle.decode_latents(latents)[0])
        with self.autocast():
            latents = sample_latents(bundle.predict, cond, uncond, alphas_cumprod=bundle.alphas_cumprod, noise=noise,
                                     steps=prompt.steps, cfg_scale=prompt.cfg_scale, v_pred=bool(bundle.v_pred),
                                     sampler=sampler)
        return to_image(bundle.decode_latents(latents)[0])
