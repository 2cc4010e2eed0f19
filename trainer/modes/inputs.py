"""Inputs of the prompt- and image-pair modes: explicit prompts, and an Original/Target image pair."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.data.pixels import DIFF_THRESHOLD, diff_mask, mask_to_latent
from trainer.errors import InputError
from trainer.models.bundle import Cond


@dataclass
class ImagePair:
    """The encoded Original and Target images (1, C, h, w each) and their per-pixel difference mask."""

    original: torch.Tensor
    target: torch.Tensor
    diff_mask: torch.Tensor  # (1, 1, h, w) of 0/1
    size_hw: tuple[int, int]
    notes: list[str]


def _load_rgb(path: str, key: str) -> Image.Image:
    from trainer.data import open_image

    if not path:
        raise InputError(key, "no image given; choose an image file")
    return open_image(path).rgb


def _fit_to_multiple(img: Image.Image, multiple: int) -> Image.Image:
    """Centre-crop to the largest size that is a multiple of ``multiple`` (no resampling of content)."""
    w, h = img.size
    nw, nh = w // multiple * multiple, h // multiple * multiple
    if nw == 0 or nh == 0:
        raise InputError("original image", f"{w}x{h} is smaller than {multiple} px; use a larger image")
    left, top = (w - nw) // 2, (h - nh) // 2
    return img.crop((left, top, left + nw, top + nh))


def empty_mask_error(pair: str) -> InputError:
    """The error for a pair that does not differ anywhere while ``diff_use_diff_mask`` is on."""
    return InputError(pair, "the original and target images do not differ anywhere (no pixel changes by more "
                            f"than {DIFF_THRESHOLD}/765), so diff_use_diff_mask leaves nothing to learn; "
                            "choose a pair that differs or untick diff_use_diff_mask")


def check_diff_mask(mask: torch.Tensor, pair: str) -> None:
    """Refuse a pair whose difference mask is empty: ``diff_use_diff_mask`` would train on nothing.

    Raises:
        InputError: naming the pair and the fix.
    """
    if not bool(mask.any()):
        raise empty_mask_error(pair)


def load_image_pair(ctx, s) -> ImagePair:
    """Load, check and encode the Original/Target pair (any size; both must match after loading).

    Raises:
        InputError: a missing/unreadable image, or sizes that differ (naming both sizes).
    """
    orig = _load_rgb(s.original_image, "original image")
    targ = _load_rgb(s.target_image, "target image")
    if orig.size != targ.size:
        raise InputError("target image", f"is {targ.size[0]}x{targ.size[1]} but the original image is "
                         f"{orig.size[0]}x{orig.size[1]}; both images must have the same size")
    multiple = int(getattr(ctx.bundle, "size_multiple", 8))
    notes: list[str] = []
    if orig.size[0] % multiple or orig.size[1] % multiple:
        before = orig.size
        orig, targ = _fit_to_multiple(orig, multiple), _fit_to_multiple(targ, multiple)
        notes.append(f"images cropped from {before[0]}x{before[1]} to {orig.size[0]}x{orig.size[1]} "
                     f"(the model needs multiples of {multiple} px)")
    a, b = np.asarray(orig, dtype=np.float32), np.asarray(targ, dtype=np.float32)
    pixels = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2) / 127.5 - 1.0
    gen = ctx.generator(7)
    with torch.no_grad():
        latents = ctx.bundle.encode_images(pixels.to(ctx.bundle.device), generator=gen).float()
    changed = diff_mask(np.asarray(orig), np.asarray(targ))
    mask = mask_to_latent(changed, tuple(latents.shape[-2:]))[None].to(latents.device)
    for note in notes:
        ctx.note(note)
    return ImagePair(latents[:1], latents[1:], mask, (orig.size[1], orig.size[0]), notes)


def encode_prompt_pair(bundle, original: str, target: str) -> tuple[Cond, Cond]:
    """Encodings of the Original and Target prompts (an empty Target is the empty prompt: erase)."""
    with torch.no_grad():
        both = bundle.encode_prompts([original or "", target or ""])
    return both.select([0]), both.select([1])


def denoised(noise, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, v_pred: bool) -> torch.Tensor:
    """The model's estimate of the clean latent x̂₀ from its ε or v prediction (used by checks and tests)."""
    a = noise.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1)
    if v_pred:
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    # zero-terminal-SNR schedules have ᾱ = 0 at the last step, where an ε model says nothing about x₀
    return (noisy - (1 - a).sqrt() * pred) / a.sqrt().clamp_min(1e-4)
