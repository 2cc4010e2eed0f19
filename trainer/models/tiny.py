"""Built-in models: tiny seeded ones for tests, a small one and real-size random ones for benchmarks.

| name          | family | what for                                                    |
|---------------|--------|-------------------------------------------------------------|
| ``tiny-sd1``  | SD1    | tests (< 2M parameters, built in milliseconds)              |
| ``tiny-sd2v`` | SD2    | tests: OpenCLIP-style pad, gelu, linear projection, v-pred  |
| ``tiny-sdxl`` | SDXL   | tests: two text encoders (hidden 32 and 48), text_time      |
| ``small-sd1`` | SD1    | CPU benchmarks (one 64 px batch-2 step takes >= 200 ms)     |
| ``sd15-random``, ``sdxl-random`` | SD1, SDXL | GPU benchmarks: real architectures, random weights |

Every VAE downsamples by 8, like the real ones, so image and bucket maths are the same everywhere.
Weights come from ``torch.manual_seed`` inside ``fork_rng``: the same name always gives the same
weights and the caller's random state is untouched.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from trainer.models.bundle import Family
from trainer.models.components import (
    Components,
    build_empty,
    build_text_encoder,
    build_unet,
    build_vae,
    default_scheduler,
    read_config_dir,
    shipped_dir,
)
from trainer.models.tokenizer import BOS, EOS, tiny_vocab_size

_SEED = 20240419
_BLOCK = 1_000_003  # prime: tiled random weights never line up with a row length

_TINY_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": [2, 4], "norm_num_groups": 32,
}
_TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 32, 32], "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 64, "scaling_factor": 0.18215,
}


def _tiny_te(hidden: int, act: str, pad_open_clip: bool, **extra: Any) -> dict[str, Any]:
    """A 2-layer CLIP text config whose special ids match the tiny tokenizer."""
    n = tiny_vocab_size()
    bos, eos = n - 2, n - 1  # the tiny vocabulary ends with <|startoftext|>, <|endoftext|>
    assert (BOS, EOS) == ("<|startoftext|>", "<|endoftext|>")
    return {"vocab_size": 1000, "hidden_size": hidden, "intermediate_size": 2 * hidden if hidden != 32 else 64,
            "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77, "hidden_act": act,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0 if pad_open_clip else eos, **extra}


def _tiny_sd1() -> dict[str, Any]:
    return {"family": Family.SD1, "v_pred": False, "unet": _TINY_UNET, "vae": _TINY_VAE,
            "text_encoder": _tiny_te(32, "quick_gelu", False)}


def _tiny_sd2v() -> dict[str, Any]:
    unet = {**_TINY_UNET, "use_linear_projection": True}
    return {"family": Family.SD2, "v_pred": True, "unet": unet, "vae": _TINY_VAE,
            "text_encoder": _tiny_te(32, "gelu", True)}


def _tiny_sdxl() -> dict[str, Any]:
    # Real SDXL has no attention on its first level; keep that shape. TE hidden sizes must differ (32 vs 48):
    # diffusers' CLIP detection confuses the two encoders of a single file otherwise (platform.md §1).
    unet = {**_TINY_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
            "cross_attention_dim": 80, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 48 + 6 * 8, "use_linear_projection": True}
    return {"family": Family.SDXL, "v_pred": False, "unet": unet, "vae": {**_TINY_VAE, "scaling_factor": 0.13025},
            "text_encoder": _tiny_te(32, "quick_gelu", False),
            "text_encoder_2": _tiny_te(48, "gelu", True, projection_dim=48)}


def _small_sd1() -> dict[str, Any]:
    unet = {**_TINY_UNET, "layers_per_block": 2, "block_out_channels": [96, 192, 192],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 128, "attention_head_dim": 8}
    te = {**_tiny_te(128, "quick_gelu", False), "num_hidden_layers": 4, "intermediate_size": 512}
    return {"family": Family.SD1, "v_pred": False, "unet": unet, "vae": _TINY_VAE, "text_encoder": te}


TINY_SPECS = {"tiny-sd1": _tiny_sd1, "tiny-sd2v": _tiny_sd2v, "tiny-sdxl": _tiny_sdxl, "small-sd1": _small_sd1}
RANDOM_SPECS = {"sd15-random": Family.SD1, "sdxl-random": Family.SDXL}
BUILTIN_NAMES = (*TINY_SPECS, *RANDOM_SPECS)


def build_builtin(name: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
    """Build a built-in model.

    Args:
        name: one of ``BUILTIN_NAMES``.
        device: where real-size random models are materialised (tiny ones are built on CPU).
        dtype: dtype real-size random models are materialised in (saves memory for SDXL).

    Returns:
        The components, weights seeded by name.

    Raises:
        KeyError: an unknown name.
    """
    if name in TINY_SPECS:
        return _build_tiny(name)
    if name in RANDOM_SPECS:
        return _build_random(name, RANDOM_SPECS[name], torch.device(device), dtype)
    raise KeyError(name)


def _build_tiny(name: str) -> Components:
    spec = copy.deepcopy(TINY_SPECS[name]())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet = build_unet(spec["unet"])
        vae = build_vae(spec["vae"])
        tes = [build_text_encoder(spec[s], s == "text_encoder_2") for s in ("text_encoder", "text_encoder_2") if s in spec]
    _sharpen_cross_attention(unet)
    v_pred = spec["v_pred"]
    return Components(spec["family"], unet, vae, tes, v_pred=v_pred,
                      scheduler=default_scheduler("v_prediction" if v_pred else "epsilon"), name=name)


@torch.no_grad()
def _sharpen_cross_attention(unet: nn.Module, factor: float = 5.0) -> None:
    """Make the prompt matter as it does in a trained model.

    With random weights, cross-attention is nearly uniform over all 77 tokens (mostly padding), so two
    prompts changed a tiny model's prediction by under 0.1 %: nothing prompt-driven (iLECO, captions)
    could be tested. Sharper keys and a stronger output projection raise that ~40-fold.
    """
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_out.0")):
            module.weight.mul_(factor)


def _build_random(name: str, family: Family, device: torch.device, dtype: torch.dtype) -> Components:
    """Real-size architecture from the shipped configs: built on meta, materialised once, filled fast."""
    configs = read_config_dir(shipped_dir(family))
    unet, vae, tes = build_empty(configs)
    gen = torch.Generator(device=device).manual_seed(_SEED)
    for module in (unet, vae, *tes):
        _materialise(module, device, dtype, gen)
    return Components(family, unet, vae, tes, v_pred=False, scheduler=default_scheduler(), name=name)


@torch.no_grad()
def _materialise(module: nn.Module, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Allocate a meta module on ``device`` and fill it with a scale-preserving pseudo-random init.

    Default layer inits (and even one RNG draw per weight) take tens of seconds at 2.6B parameters on
    CPU, so weights are tiled from one random block of prime length (rows never repeat exactly) and
    scaled by 1/sqrt(fan_in): activations stay in range, which is all a benchmark needs.
    """
    nn.Module.to(module, dtype=dtype)  # still on meta: free; diffusers' own .to() warns about upcasting
    module.to_empty(device=device)
    block = torch.randn(_BLOCK, generator=gen, device=device, dtype=torch.float32).to(dtype)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            flat, scale = param.view(-1), 1.0 / math.sqrt(math.prod(param.shape[1:]))
            for start in range(0, flat.numel(), _BLOCK):
                part = flat[start : start + _BLOCK]
                torch.mul(block[: part.numel()], scale, out=part)  # one pass over memory: fill and scale
        elif "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    for sub in module.modules():
        buf = getattr(sub, "position_ids", None)
        if isinstance(buf, torch.Tensor):
            sub.position_ids = torch.arange(buf.shape[-1], device=device).expand((1, -1))
