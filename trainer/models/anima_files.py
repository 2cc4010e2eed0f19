"""Loading the single files Anima users keep: transformer (with its LLM adapter), Qwen3-0.6B, Qwen-Image VAE.

ComfyUI keeps ``diffusion_models/anima-*.safetensors``, ``text_encoders/qwen_3_06b_base.safetensors`` and
``vae/qwen_image_vae.safetensors``; Forge Neo the same files in ``Stable-diffusion``, ``text_encoder``, ``VAE``.
Facts (Forge Neo ``backend/nn/anima.py`` and ``backend/loader.py``; ComfyUI ``comfy/model_detection.py``):

* transformer: Cosmos-Predict2 (MiniTrainDIT) native names under ``net.`` (or ``model.diffusion_model.``):
  ``blocks.N.{self_attn,cross_attn}.{q,k,v,output}_proj``, ``adaln_modulation_{self_attn,cross_attn,mlp}``,
  ``mlp.layer1/2``, ``x_embedder.proj.1`` (its input includes the padding-mask channel), ``t_embedder.1``,
  ``t_embedding_norm``, ``final_layer``; plus ``llm_adapter.*`` (Neo moves it to the text-encoder side). diffusers'
  ``convert_cosmos_transformer_checkpoint_to_diffusers`` reads the DiT part; :func:`cosmos_to_native` is our inverse.
  Sizes come from the shapes (ComfyUI: 2048 channels, 28 blocks, 16 heads, rope h/w ×4 for 16-channel latents).
* text encoder: Qwen3-0.6B in transformers' causal-LM layout (``model.layers.N…``).
* VAE: Wan 2.1 native names (``encoder.downsamples.K.residual.{0,2,3,6}``, ``middle.{0,1,2}``, ``head.{0,2}``,
  ``conv1``/``conv2`` as the quant convs); read and written by :func:`wan_native_name` (diffusers' converter
  only knows two residual blocks per level; ours follows ``num_res_blocks``). Latent mean/std per channel come
  from the shipped Qwen-Image VAE config.
* tokenizers: Qwen's (as for Z-Image) and T5's (the adapter embeds T5 ids), both found offline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.dit import DiTParts
from trainer.models.dit_files import (
    TE_PREFIXES,
    count_indices,
    has_tokenizer,
    hf_cached,
    load_part,
    qwen3_file_config,
    read_shapes,
    refuse_scaled_fp8,
    strip,
)

CONFIGS = Path(__file__).parent / "configs" / "anima"
ANIMA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
_T5_HOSTS = ("backend/huggingface/circlestone-labs/Anima/tokenizer_2", "comfy/text_encoders/t5_tokenizer")
_T5_CACHE = (("circlestone-labs/Anima", "tokenizer_2"), ("google/t5-v1_1-xxl", ""), ("google-t5/t5-base", ""))
_QWEN_HOST = "backend/huggingface/circlestone-labs/Anima/tokenizer"


def read_config(part: str) -> dict[str, Any]:
    """One shipped Anima config (``transformer``, ``text_encoder``, ``vae``, ``scheduler``, ``llm_adapter``)."""
    return {k: v for k, v in json.loads((CONFIGS / f"{part}.json").read_text(encoding="utf-8")).items()
            if not k.startswith("_")}


def is_anima(keys: Mapping[str, Any]) -> bool:
    """An Anima transformer file: a Cosmos DiT with the LLM adapter inside."""
    bare = strip(keys, ANIMA_PREFIXES)
    return any(k.startswith("llm_adapter.") for k in bare) and "x_embedder.proj.1.weight" in bare


# -- configs from shapes -----------------------------------------------------------------------------

def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers ``CosmosTransformer3DModel`` arguments from native shapes, over Anima's shipped config."""
    cfg = read_config("transformer")
    per = 1
    for p in cfg["patch_size"]:
        per *= p
    dim, inputs = shapes["x_embedder.proj.1.weight"][0], shapes["x_embedder.proj.1.weight"][1] // per
    out = shapes["final_layer.linear.weight"][0] // per
    head_dim = shapes["blocks.0.self_attn.q_norm.weight"][0]
    cfg.update(in_channels=out if inputs == out + 1 else inputs, out_channels=out, concat_padding_mask=inputs == out + 1,
               num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
               num_layers=count_indices(shapes, r"blocks\.(\d+)\."),
               mlp_ratio=shapes["blocks.0.mlp.layer1.weight"][0] / dim,
               text_embed_dim=shapes["blocks.0.cross_attn.k_proj.weight"][1],
               adaln_lora_dim=shapes["blocks.0.adaln_modulation_self_attn.1.weight"][0])
    return cfg


def adapter_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``LLMAdapter`` arguments from the (``llm_adapter.``-stripped) shapes."""
    vocab, target = shapes["embed.weight"]
    model_dim = shapes["blocks.0.self_attn.q_proj.weight"][0]
    return {"source_dim": shapes["blocks.0.cross_attn.k_proj.weight"][1], "target_dim": target, "model_dim": model_dim,
            "num_layers": count_indices(shapes, r"blocks\.(\d+)\."),
            "num_heads": model_dim // shapes["blocks.0.self_attn.q_norm.weight"][0], "vocab_size": vocab,
            "layer_norm": "blocks.0.norm_mlp.bias" in shapes}


def vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Qwen-Image VAE arguments (with its per-channel latent mean/std) from native Wan shapes."""
    cfg = read_config("vae")
    levels = len(cfg["dim_mult"])
    entries = count_indices(shapes, r"encoder\.downsamples\.(\d+)\.")  # levels × R resnets + (levels − 1) resamples
    cfg.update(base_dim=shapes["encoder.conv1.weight"][0], z_dim=shapes["conv2.weight"][0],
               num_res_blocks=(entries - (levels - 1)) // levels)
    return cfg


# -- native names --------------------------------------------------------------------------------------

_COSMOS = ((r"^time_embed\.t_embedder\.", "t_embedder.1."), (r"^time_embed\.norm\.", "t_embedding_norm."),
           (r"^transformer_blocks\.", "blocks."), (r"\.norm1\.linear_(\d)\.", r".adaln_modulation_self_attn.\1."),
           (r"\.norm2\.linear_(\d)\.", r".adaln_modulation_cross_attn.\1."),
           (r"\.norm3\.linear_(\d)\.", r".adaln_modulation_mlp.\1."), (r"\.attn1\.", ".self_attn."),
           (r"\.attn2\.", ".cross_attn."), (r"\.to_([qkv])\.", r".\1_proj."), (r"\.to_out\.0\.", ".output_proj."),
           (r"\.norm_([qk])\.", r".\1_norm."), (r"\.ff\.net\.0\.proj\.", ".mlp.layer1."), (r"\.ff\.net\.2\.", ".mlp.layer2."),
           (r"^patch_embed\.proj\.", "x_embedder.proj.1."), (r"^norm_out\.linear_(\d)\.", r"final_layer.adaln_modulation.\1."),
           (r"^proj_out\.", "final_layer.linear."))


def cosmos_to_native(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``CosmosTransformer3DModel`` parameters -> Cosmos-Predict2 native names (no prefix)."""
    out = {}
    for key, value in state.items():
        for pattern, new in _COSMOS:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


_WAN_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
               "conv2": "residual.6", "conv_shortcut": "shortcut"}
_WAN_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
            "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
            "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2"}


def _resnet_leaf(rest: str) -> str:
    for ours, theirs in _WAN_RESNET.items():
        if rest.startswith(ours + ".") or rest == ours:
            return theirs + rest[len(ours):]
    return rest  # resample.N / time_conv keep their names


def wan_native_name(key: str, num_res_blocks: int) -> str:
    """The Wan 2.1 native name of one diffusers ``AutoencoderKLQwenImage`` parameter."""
    for ours, theirs in _WAN_TOP.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    if m := re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)$", key):
        index = 1 if m[2] == "attentions" else 2 * int(m[3])  # middle = (resnet, attention, resnet)
        leaf = m[4] if m[2] == "attentions" else _resnet_leaf(m[4])
        return f"{m[1]}.middle.{index}.{leaf}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", key):  # both flatten levels the same way
        return f"encoder.downsamples.{m[1]}.{_resnet_leaf(m[2])}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{_resnet_leaf(m[3])}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}"
    raise KeyError(key)


def wan_to_native(state: Mapping[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    return {wan_native_name(k, num_res_blocks): v for k, v in state.items()}


def wan_from_native(native: Mapping[str, torch.Tensor], model: nn.Module, num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Native Wan keys -> the names of ``model`` (keys the model does not have stay as they are: strict
    loading then names them)."""
    names = {wan_native_name(k, num_res_blocks): k for k in model.state_dict()}
    return {names.get(k, k): v for k, v in native.items()}


# -- checks before any weight is read -----------------------------------------------------------------

def check_anima_set(transformer: str, text_encoder: str, vae: str) -> tuple[dict, dict, dict, dict]:
    """Check the three Anima files fit together from their headers; returns (DiT, adapter, TE, VAE) configs.

    Raises:
        InputError: a missing part (naming its field), a Qwen3 whose hidden size is not the adapter's
            source size, a VAE that is not a 16-channel Wan/Qwen-Image VAE.
    """
    shapes = strip(read_shapes(transformer, "model"), ANIMA_PREFIXES)
    refuse_scaled_fp8(transformer, shapes, "model")
    if not text_encoder:
        raise InputError(transformer, "is an Anima transformer without its text encoder: choose the Qwen3-0.6B file "
                                      "(qwen_3_06b_base.safetensors) in the text_encoder field")
    try:
        t_cfg = transformer_config({k: v for k, v in shapes.items() if not k.startswith("llm_adapter.")})
        a_cfg = adapter_config(strip({k: v for k, v in shapes.items() if k.startswith("llm_adapter.")}, ("llm_adapter.",)))
    except KeyError as err:
        raise InputError(transformer, f"model: an Anima transformer without {err}; the file is incomplete") from err
    te_cfg = qwen3_file_config(text_encoder, "Anima's Qwen3-0.6B (qwen_3_06b_base.safetensors)")
    if te_cfg["hidden_size"] != a_cfg["source_dim"]:
        raise InputError(text_encoder, f"text_encoder: has hidden size {te_cfg['hidden_size']} but Anima's LLM adapter "
                                       f"reads {a_cfg['source_dim']} (Qwen3-0.6B); choose qwen_3_06b_base.safetensors")
    if not vae:
        raise InputError(transformer, "is an Anima transformer without a VAE: choose the Qwen-Image VAE "
                                      "(qwen_image_vae.safetensors) in the vae field")
    v_shapes = strip(read_shapes(vae, "vae"), VAE_PREFIXES)
    if "encoder.conv1.weight" not in v_shapes or "conv2.weight" not in v_shapes:
        kind = "an SD/Flux-style VAE (2-D)" if "encoder.conv_in.weight" in v_shapes else "not a Qwen-Image/Wan VAE file"
        raise InputError(vae, f"vae: is {kind}; Anima needs the Qwen-Image VAE: choose qwen_image_vae.safetensors")
    v_cfg = vae_config(v_shapes)
    if v_cfg["z_dim"] != t_cfg["in_channels"]:
        raise InputError(vae, f"vae: has {v_cfg['z_dim']} latent channels but Anima needs {t_cfg['in_channels']} "
                              "(the Qwen-Image VAE); choose qwen_image_vae.safetensors")
    return t_cfg, a_cfg, te_cfg, v_cfg


def find_t5_tokenizer(*files: str) -> Path:
    """Where a T5 tokenizer is, offline: ``tokenizer_2/`` or ``t5_tokenizer/`` beside a file, Forge Neo's or
    ComfyUI's copy above the files, or the Hugging Face cache (local files only).

    Raises:
        InputError: none found; names the ``text_encoder`` field and where to put the files.
    """
    candidates: list[Path] = []
    for file in files:
        here = Path(file).resolve().parent
        candidates += [here / "tokenizer_2", here / "t5_tokenizer"]
    for file in files:
        candidates += [a / rel for a in Path(file).resolve().parents for rel in _T5_HOSTS]
    for folder in candidates:
        if folder.is_dir() and ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
            return folder
    for repo, sub in _T5_CACHE:
        found = hf_cached(repo, sub)
        if found is not None:
            return found
    beside = Path(files[0]).resolve().parent / "tokenizer_2"
    raise InputError(files[0], f"text_encoder: no T5 tokenizer found offline (Anima's adapter reads T5 token ids); put "
                               f"T5's tokenizer files (tokenizer.json or spiece.model) in {beside}")


def _qwen_tokenizer(text_encoder: str, transformer: str) -> Path:
    from trainer.models.dit_files import find_qwen_tokenizer

    for file in (text_encoder, transformer):
        for ancestor in Path(file).resolve().parents:
            if has_tokenizer(ancestor / _QWEN_HOST):
                return ancestor / _QWEN_HOST
    return find_qwen_tokenizer(text_encoder, transformer)


# -- loading -------------------------------------------------------------------------------------------

def load_anima_files(transformer: str, text_encoder: str, vae: str, *, dtype: torch.dtype | None = None) -> DiTParts:
    """Load the Anima single-file set (transformer with LLM adapter, Qwen3-0.6B, Qwen-Image VAE) offline.

    Raises:
        InputError: a missing, wrong or mismatched part, or no tokenizer; nothing is loaded then.
    """
    from diffusers import AutoencoderKLQwenImage, CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from trainer.models.anima_adapter import LLMAdapter
    from trainer.models.checkpoint import read_state_dict
    from trainer.models.dit_files import rebuild_rotary

    t_cfg, a_cfg, te_cfg, v_cfg = check_anima_set(transformer, text_encoder, vae)
    qwen_dir, t5_dir = _qwen_tokenizer(text_encoder, transformer), find_t5_tokenizer(text_encoder, transformer)
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)
    tokenizer_2 = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
    for tok, size, where in ((tokenizer, te_cfg["vocab_size"], qwen_dir), (tokenizer_2, a_cfg["vocab_size"], t5_dir)):
        if len(tok) > size:
            raise InputError(str(where), f"text_encoder: this tokenizer has {len(tok)} tokens but its model only "
                                         f"{size}; it is not the right one: remove it or replace it")
    with torch.device("meta"):
        dit_model = CosmosTransformer3DModel(**t_cfg)
        adapter = LLMAdapter(**a_cfg)
        te_model = Qwen3Model(Qwen3Config(**te_cfg))
        vae_model = AutoencoderKLQwenImage(**v_cfg)
    state = strip(read_state_dict(transformer, dtype)[0], ANIMA_PREFIXES)
    adapter_state = {k.removeprefix("llm_adapter."): state.pop(k) for k in list(state) if k.startswith("llm_adapter.")}
    load_part(transformer, "model", adapter, adapter_state)
    load_part(transformer, "model", dit_model, convert_cosmos_transformer_checkpoint_to_diffusers(
        {"net." + k: v for k, v in state.items()}))
    state = {k: v for k, v in strip(read_state_dict(text_encoder, dtype)[0], TE_PREFIXES).items() if k != "lm_head.weight"}
    load_part(text_encoder, "text_encoder", te_model, state)
    rebuild_rotary(te_model)
    native = strip(read_state_dict(vae, dtype)[0], VAE_PREFIXES)
    load_part(vae, "vae", vae_model, wan_from_native(native, vae_model, v_cfg["num_res_blocks"]))
    del state, native, adapter_state
    return DiTParts(Family.ANIMA, dit_model, te_model, tokenizer, vae_model, read_config("scheduler"),
                    Path(transformer).stem, adapter=adapter, tokenizer_2=tokenizer_2)


def save_anima_files(parts: DiTParts, folder: str | Path, *, tokenizer_2: Any = None, dtype: torch.dtype | None = None,
                     folders: tuple[str, str, str] = ("diffusion_models", "text_encoders", "vae"),
                     ) -> tuple[Path, Path, Path]:
    """Write an Anima part set as ComfyUI keeps it (``net.`` DiT + ``llm_adapter.``, ``model.`` Qwen3 with
    ``tokenizer/`` and, given a saveable ``tokenizer_2``, ``tokenizer_2/`` beside it, native Wan VAE)."""
    from trainer.models.checkpoint import _atomic_save

    def cast(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                for k, v in state.items()}

    root = Path(folder)
    paths = (root / folders[0] / f"{parts.name}.safetensors", root / folders[1] / "qwen_3_06b_base.safetensors",
             root / folders[2] / "qwen_image_vae.safetensors")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    assert parts.adapter is not None
    dit = {"net." + k: v for k, v in cosmos_to_native(parts.transformer.state_dict()).items()}
    dit.update({"net.llm_adapter." + k: v for k, v in parts.adapter.state_dict().items()})
    _atomic_save(cast(dit), paths[0], {})
    _atomic_save(cast({"model." + k: v for k, v in parts.text_encoder.state_dict().items()}), paths[1], {})
    parts.tokenizer.save_pretrained(paths[1].parent / "tokenizer")
    if tokenizer_2 is not None:
        tokenizer_2.save_pretrained(paths[1].parent / "tokenizer_2")
    num_res = int(parts.vae.config.num_res_blocks)
    _atomic_save(cast(wan_to_native(parts.vae.state_dict(), num_res)), paths[2], {})
    return paths
