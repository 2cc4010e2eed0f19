"""Builders of the models users have on disk, made in-process from the seeded tiny models.

- ``small_vocab_folder``: a diffusers SD1 folder with its own 64-token tokenizer (the built-in tiny
  tokenizer has 199 ids and cannot drive it) and its own scheduler config.
- ``civitai_file``: a single file as downloaded: no ``traintrain.family`` and no scheduler in our
  metadata (the family comes from the keys, v/zero-SNR from markers), optionally fp16/bf16, with a full
  EMA copy, without a baked VAE, or with the pre-``text_model.`` CLIP prefix. The tiny architecture
  itself still travels in ``traintrain.configs`` (nothing else could rebuild it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.models.checkpoint import save_diffusers_folder, save_single_file
from trainer.models.components import Components, fit_clip_keys, load_strict
from trainer.models.tiny import build_builtin

SMALL_VOCAB = 64
_MERGES = ("t h", "th e</w>", "a t</w>", "c at</w>", "o g</w>", "d og</w>", "i n", "o n</w>", "e r</w>", "a n")


def small_tokenizer(folder: Path):
    """A 64-token CLIP BPE tokenizer (26 letters, the same with ``</w>``, 10 merges, BOS, EOS)."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters] + ["".join(m.split()) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == SMALL_VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def small_vocab_components(tmp: Path) -> Components:
    """tiny-sd1 whose text encoder has 64 ids and a matching tokenizer, with a zero-SNR trailing schedule."""
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = build_builtin("tiny-sd1")
    te = parts.text_encoders[0]
    config = te.config.to_dict()
    config.update(vocab_size=SMALL_VOCAB, bos_token_id=SMALL_VOCAB - 2, eos_token_id=SMALL_VOCAB - 1,
                  pad_token_id=SMALL_VOCAB - 1)
    with torch.device("meta"):
        small = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}))
    state = {k: v.clone() for k, v in te.state_dict().items()}
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    state[key] = state[key][:SMALL_VOCAB].clone()
    load_strict(small, fit_clip_keys(state, small))
    parts.text_encoders = [small]
    parts.tokenizers = [small_tokenizer(tmp / "tok-src")]
    parts.scheduler = {**parts.scheduler, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                       "prediction_type": "v_prediction"}
    parts.v_pred = True
    parts.name = "small-vocab"
    return parts


def small_vocab_folder(tmp: Path) -> Path:
    """Write ``small_vocab_components`` as a diffusers folder (scheduler class as Hub folders have it)."""
    root = save_diffusers_folder(small_vocab_components(tmp), tmp / "small-vocab")
    path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, "_class_name": "EulerDiscreteScheduler"}), encoding="utf-8")
    return root


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def civitai_file(parts: Components, path: Path, *, dtype: torch.dtype | None = None, ema: bool = False,
                 no_vae: bool = False, old_clip_prefix: bool = False, markers: tuple[str, ...] = (),
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``parts`` as a single file the way they come from Civitai (see the module docstring).

    Args:
        dtype: store the weights in fp16/bf16.
        ema: add a full EMA copy (``model_ema.<dot-less name>`` = weights + 0.01·noise, plus decay/num_updates).
        no_vae: drop the baked VAE.
        old_clip_prefix: SD1 text encoder as ``cond_stage_model.transformer.<...>`` (no ``text_model.``).
        markers: marker keys to keep or add (``v_pred``, ``ztsnr``); others are removed.
        metadata: extra safetensors metadata (e.g. ``modelspec.prediction_type``).
    """
    tmp = path.with_suffix(".ours.safetensors")
    save_single_file(parts, tmp)
    state, meta = read_file(tmp)
    tmp.unlink()
    configs = json.loads(meta["traintrain.configs"])
    configs.pop("scheduler", None)
    meta = {"traintrain.configs": json.dumps(configs), **(metadata or {})}
    state = {k: v for k, v in state.items() if k not in ("v_pred", "ztsnr")}
    state.update({m: torch.tensor([]) for m in markers})
    if no_vae:
        state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    if old_clip_prefix:
        old = "cond_stage_model.transformer.text_model."
        state = {("cond_stage_model.transformer." + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if ema:
        gen = torch.Generator().manual_seed(3)
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            value = state[key]
            noisy = value.float() + 0.01 * torch.randn(value.shape, generator=gen)
            state["model_ema." + key.removeprefix("model.").replace(".", "")] = noisy.to(value.dtype)
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    save_file(state, str(path), metadata=meta)
    return path


def ema_weights(path: Path) -> dict[str, torch.Tensor]:
    """The ``model_ema.*`` U-Net tensors of a file, under their ``model.diffusion_model.*`` names."""
    state, _ = read_file(path)
    by_flat = {k.removeprefix("model.").replace(".", ""): k for k in state if k.startswith("model.diffusion_model.")}
    return {by_flat[k[len("model_ema."):]]: v for k, v in state.items()
            if k.startswith("model_ema.") and k[len("model_ema."):] in by_flat}
