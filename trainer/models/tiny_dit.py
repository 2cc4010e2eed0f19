"""Built-in tiny flow-matching DiTs for tests: ``tiny-zimage`` and ``tiny-anima``.

Configs ship in ``configs/tiny-zimage`` and ``configs/tiny-anima`` (same classes and latent scaling as the
real models, sizes cut to a few hundred thousand parameters). Tokenizers are built here, offline: a
byte-level BPE with no merges and Qwen's special tokens stands in for Qwen2's, and a byte tokenizer with
T5's pad/eos ids stands in for Anima's T5 tokenizer. Weights are seeded by name inside ``fork_rng``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.models.bundle import Family
from trainer.models.dit import DiTParts

_SEED = 20261207
CONFIGS = Path(__file__).parent / "configs"
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_DIT_NAMES = ("tiny-zimage", "tiny-anima")


def _read(name: str, part: str) -> dict[str, Any]:
    return json.loads((CONFIGS / name / f"{part}.json").read_text(encoding="utf-8"))


def build_qwen_byte_tokenizer() -> Any:
    """A Qwen2-style byte-level tokenizer (256 byte symbols + Qwen's specials), padding with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trainer.models.tokenizer import _byte_symbols

    vocab = {s: i for i, s in enumerate(sorted(_byte_symbols(), key=_byte_order))}
    for special in QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="right")


def _byte_order(symbol: str) -> int:
    """GPT-2's byte-to-symbol map, inverted: printable bytes map to themselves, the rest to 256 + i."""
    from trainer.models.tokenizer import _byte_symbols

    code = ord(symbol)
    if code < 256:
        return code
    printable = {ord(s) for s in _byte_symbols() if ord(s) < 256}
    extra = [b for b in range(256) if b not in printable]
    return extra[code - 256]


class ByteT5Tokenizer:
    """T5-like ids for the tiny Anima: pad 0, eos 1, bytes from 3; called like a transformers tokenizer."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, prompts: list[str], padding: str = "longest", return_tensors: str = "pt", **_: Any) -> dict:
        rows = [[3 + b for b in p.encode("utf-8")][:254] + [self.eos_token_id] for p in prompts]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}


def _qwen(config: dict[str, Any], vocab: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3Model

    cfg = {k: v for k, v in config.items() if k != "model_type"}
    return Qwen3Model(Qwen3Config(vocab_size=vocab, pad_token_id=vocab - 3, **cfg))


def build_tiny_dit(name: str) -> DiTParts:
    """The built-in ``tiny-zimage`` or ``tiny-anima`` (same weights for the same name, caller's RNG untouched).

    Raises:
        KeyError: an unknown name.
    """
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, CosmosTransformer3DModel, ZImageTransformer2DModel

    if name not in TINY_DIT_NAMES:
        raise KeyError(name)
    tokenizer = build_qwen_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        text_encoder = _qwen(_read(name, "text_encoder"), len(tokenizer))
        tcfg = {k: v for k, v in _read(name, "transformer").items() if not k.startswith("_")}
        vcfg = {k: v for k, v in _read(name, "vae").items() if not k.startswith("_")}
        if name == "tiny-zimage":
            transformer, vae, adapter = ZImageTransformer2DModel(**tcfg), AutoencoderKL(**vcfg), None
            family, tokenizer_2 = Family.ZIMAGE, None
        else:
            from trainer.models.anima_adapter import LLMAdapter

            transformer, vae = CosmosTransformer3DModel(**tcfg), AutoencoderKLQwenImage(**vcfg)
            adapter, family, tokenizer_2 = LLMAdapter(**_read(name, "llm_adapter")), Family.ANIMA, ByteT5Tokenizer()
        _sharpen(transformer)
        _calibrate_posterior(vae)
    return DiTParts(family, transformer, text_encoder, tokenizer, vae, _read(name, "scheduler"), name,
                    adapter=adapter, tokenizer_2=tokenizer_2)


# log-variance of the tiny VAEs' latent posterior: σ = e^(−5) ≈ 0.007, about what trained VAEs give
_LOGVAR = -10.0


@torch.no_grad()
def _calibrate_posterior(vae: torch.nn.Module) -> None:
    """Give the random VAE a trained VAE's posterior: narrow, with latents of unit spread once normalised.

    Seeded at random, the layer that yields (mean, log-variance) gives log-variance ≈ 0, so a latent
    "sample" is mostly its unit noise (two draws of one image differed more than two different images, and
    latents a run encoded were not the ones a test encoded), and the tiny Wan encoder's means vary ~15× less
    than its ``latents_std``, so images barely differed after normalising. The log-variance rows become the
    constant ``_LOGVAR``; the mean rows are scaled so that normalised latents of a seeded test image have
    unit standard deviation, as a trained VAE's do.
    """
    conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    half = conv.weight.shape[0] // 2  # DiagonalGaussianDistribution: mean, logvar = chunk(2, dim=1)
    conv.weight[half:].zero_()
    conv.bias[half:].fill_(_LOGVAR)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(_SEED)) * 2 - 1
    video = getattr(vae.config, "z_dim", None) is not None
    mean = vae.encode(image.unsqueeze(2) if video else image).latent_dist.mean.float()
    if video:  # per-channel std (Wan): latents = (z − mean_c) / std_c
        spread = torch.tensor(vae.config.latents_std).mean()
    else:  # latents = (z − shift) · scaling_factor
        spread = torch.tensor(1.0 / vae.config.scaling_factor)
    factor = float(spread / mean.std())
    conv.weight[:half].mul_(factor)
    conv.bias[:half].mul_(factor)


@torch.no_grad()
def _sharpen(transformer: torch.nn.Module) -> None:
    """Random DiTs start with near-zero output layers and weak text paths (diffusers zero-inits some):
    give the final projection and the caption/cross-attention projections weight so prompts matter."""
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and (
            name.endswith(("attn2.to_k", "attn2.to_v", "proj_out", "final_layer.linear", "linear.2-1"))
            or "cap_embedder" in name or "all_final_layer" in name
        ):
            if module.weight.abs().max() == 0:
                torch.nn.init.normal_(module.weight, std=0.05)
            module.weight.mul_(3.0)
        # random timestep embeddings are small, so the blocks' gates (Z-Image: tanh of the modulation;
        # Cosmos: linear) start near 0 and the blocks, where the adapters sit, barely reach the output
        if name.endswith("adaLN_modulation.0") and isinstance(module, torch.nn.Linear):
            module.bias.add_(0.5)
        if name.endswith(("norm1.linear_2", "norm2.linear_2", "norm3.linear_2")):
            module.weight.mul_(5.0)
