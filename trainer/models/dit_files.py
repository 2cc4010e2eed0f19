"""Loading the single files Z-Image users keep: transformer, Qwen3 text encoder and VAE, as separate files.

ComfyUI and Forge Neo users keep three files (``models/diffusion_models`` or ``Stable-diffusion``,
``models/text_encoder(s)``, ``models/VAE``); the standalone UI and the CLI name the extra two in the
``text_encoder`` and ``vae`` fields. Facts this module relies on (Forge Neo ``backend/loader.py``,
``backend/nn/lumina.py``; ComfyUI ``comfy/model_detection.py``):

* transformer: Lumina/NextDiT native names, bare or under ``model.diffusion_model.``; attention as one
  fused ``attention.qkv`` (q, k, v stacked on the output axis), ``attention.out``, ``q_norm``/``k_norm``,
  ``x_embedder``, ``final_layer``. diffusers' own ``convert_z_image_transformer_checkpoint_to_diffusers``
  reads it, so a file loads exactly as diffusers reads it; :func:`zimage_to_native` is our inverse.
* text encoder: Qwen3 in transformers' causal-LM layout (``model.layers.N…``, ``model.norm``, maybe
  ``lm_head``), as ``qwen_3_4b.safetensors``; no tokenizer inside (found offline, :func:`find_qwen_tokenizer`).
* VAE: Flux's ``ae.safetensors`` in BFL/ldm names (``encoder.down.N.block.M…``), or diffusers names.

The architectures come from the real models' configs shipped in ``configs/zimage`` (Z-Image-Turbo's, as Forge
Neo ships them), with the sizes a file's shapes state (so the same code reads the real model and tiny ones);
latent scale/shift are read from the VAE config. Every check runs on the files' headers, before a weight is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.dit import DiTParts

CONFIGS = Path(__file__).parent / "configs" / "zimage"
TE_PREFIXES = ("text_encoders.qwen3_4b.transformer.model.", "model.")  # longest first
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# where users already have Qwen's tokenizer offline, relative to an ancestor of their model files
_HOST_TOKENIZERS = ("backend/huggingface/Tongyi-MAI/Z-Image-Turbo/tokenizer",  # Forge Neo
                    "comfy/text_encoders/qwen25_tokenizer")  # ComfyUI (Qwen2.5 and Qwen3 share the vocabulary)
# Hugging Face cache entries (HF_HUB_OFFLINE-style lookups, local files only): (repo, sub-folder)
_HF_TOKENIZERS = (("Tongyi-MAI/Z-Image-Turbo", "tokenizer"), ("Tongyi-MAI/Z-Image", "tokenizer"), ("Qwen/Qwen3-4B", ""))


def read_config(part: str) -> dict[str, Any]:
    """One shipped Z-Image config (``transformer``, ``text_encoder``, ``vae``, ``scheduler``)."""
    return json.loads((CONFIGS / f"{part}.json").read_text(encoding="utf-8"))


def read_shapes(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a ``.safetensors`` header (no weight is read).

    Raises:
        InputError: missing, truncated or not a safetensors file; the message names the field ``what``.
    """
    from safetensors import SafetensorError, safe_open

    from trainer.models.checkpoint import check_complete

    if not os.path.isfile(path):
        raise InputError(path, f"{what}: file not found; choose an existing .safetensors file")
    check_complete(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(path, f"{what}: cannot be read as .safetensors ({err}); choose a .safetensors file") from err


def refuse_scaled_fp8(path: str, keys: Iterable[str], field: str) -> None:
    """ComfyUI's "fp8 scaled" files keep a scale per weight: cast as they are, the weights would be wrong.

    Raises:
        InputError: such a file, naming the field and the fix.
    """
    if any(k.endswith(("scale_weight", "scaled_fp8", "weight_scale")) for k in keys):
        raise InputError(path, f"{field}: is an fp8-scaled file (weights with per-tensor scales), which training "
                               "cannot use; choose the bf16 or fp16 file of the same model")


def strip(keys: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    """The mapping with the first matching prefix removed from each key."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in keys.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def is_zimage(keys: Iterable[str]) -> bool:
    """A Z-Image transformer file (native keys, with or without ``model.diffusion_model.``)."""
    return any(k.endswith("context_refiner.0.attention.k_norm.weight") for k in keys)


def count_indices(keys: Iterable[str], pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# -- configs from shapes -----------------------------------------------------------------------------

def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Z-Image's shipped transformer config with the sizes the native file's shapes state."""
    cfg = {k: v for k, v in read_config("transformer").items() if not k.startswith("_")}
    dim, head_dim = shapes["x_embedder.weight"][0], shapes["layers.0.attention.q_norm.weight"][0]
    patch, frames = cfg["all_patch_size"][0], cfg["all_f_patch_size"][0]
    n_heads = dim // head_dim
    qkv = shapes["layers.0.attention.qkv.weight"][0] // head_dim
    base_axes = cfg["axes_dims"]  # the rotary split keeps the real model's proportions (1/4, 3/8, 3/8)
    axes = [head_dim * a // sum(base_axes) for a in base_axes]
    axes[0] += head_dim - sum(axes)
    cfg.update(dim=dim, n_heads=n_heads, n_kv_heads=(qkv - n_heads) // 2, axes_dims=axes,
               n_layers=count_indices(shapes, r"layers\.(\d+)\."), n_refiner_layers=count_indices(shapes, r"noise_refiner\.(\d+)\."),
               cap_feat_dim=shapes["cap_embedder.1.weight"][1],
               in_channels=shapes["x_embedder.weight"][1] // (patch * patch * frames))
    return cfg


def text_encoder_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Qwen3-4B's shipped config with the sizes of a (prefix-stripped) Qwen3 file."""
    cfg = read_config("text_encoder")
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    cfg.update(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
               num_hidden_layers=count_indices(shapes, r"layers\.(\d+)\."),
               intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
               num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
               num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim)
    cfg["max_window_layers"] = cfg["num_hidden_layers"]
    for key in ("bos_token_id", "eos_token_id"):  # Qwen's ids; a small test vocabulary has none of them
        if cfg.get(key) is not None and cfg[key] >= vocab:
            cfg[key] = None
    return cfg


def _bare_vae(shapes: Mapping[str, Any]) -> dict[str, Any]:
    return strip(shapes, ("first_stage_model.", "vae."))


def vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Flux's shipped VAE config (with its scaling/shift) with the sizes of an ldm or diffusers VAE file."""
    cfg = {k: v for k, v in read_config("vae").items() if not k.startswith("_")}
    bare = _bare_vae(shapes)
    if "encoder.conv_in.weight" not in bare:
        raise KeyError("encoder.conv_in.weight")
    ldm = any(k.startswith("encoder.down.") for k in bare)
    level, block = (r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.") if ldm else (
        r"encoder\.down_blocks\.(\d+)\.", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    levels = count_indices(bare, level)
    conv1 = "encoder.down.{}.block.0.conv1.weight" if ldm else "encoder.down_blocks.{}.resnets.0.conv1.weight"
    cfg.update(block_out_channels=[bare[conv1.format(i)][0] for i in range(levels)],
               layers_per_block=count_indices(bare, block), latent_channels=bare["encoder.conv_out.weight"][0] // 2,
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               use_quant_conv="quant_conv.weight" in bare, use_post_quant_conv="post_quant_conv.weight" in bare)
    return cfg


# -- checks before any weight is read -----------------------------------------------------------------


def qwen3_file_config(path: str, choose: str) -> dict[str, Any]:
    """A Qwen3 text-encoder file's config, read from its header (no weight is read).

    Raises:
        InputError: a ComfyUI fp8-scaled file, or a file that is not Qwen3 (``choose`` names the right one).
    """
    te = strip(read_shapes(path, "text_encoder"), TE_PREFIXES)
    refuse_scaled_fp8(path, te, "text_encoder")
    if "layers.0.self_attn.q_norm.weight" not in te or "embed_tokens.weight" not in te:
        raise InputError(path, f"text_encoder: is not a Qwen3 text encoder file; choose {choose}")
    return text_encoder_config(te)


def check_zimage_set(transformer: str, text_encoder: str, vae: str) -> tuple[dict, dict, dict]:
    """Check the three files fit together, from their headers; returns the (transformer, TE, VAE) configs.

    Raises:
        InputError: a missing part (naming its field), a text encoder whose hidden size is not the
            transformer's ``cap_feat_dim``, a VAE whose latent channels are not its ``in_channels``.
    """
    dit = strip(read_shapes(transformer, "model"), DIT_PREFIXES)
    refuse_scaled_fp8(transformer, dit, "model")
    if not is_zimage(dit):
        raise InputError(transformer, "model: is not a Z-Image transformer file; choose a Z-Image checkpoint")
    if not text_encoder:
        raise InputError(transformer, "is a Z-Image transformer without its text encoder: choose the Qwen3-4B file "
                                      "(qwen_3_4b.safetensors) in the text_encoder field")
    try:
        t_cfg = transformer_config(dit)
    except KeyError as err:
        raise InputError(transformer, f"model: a Z-Image transformer without {err}; the file is incomplete") from err
    te_cfg = qwen3_file_config(text_encoder, "Z-Image's Qwen3-4B (qwen_3_4b.safetensors)")
    if te_cfg["hidden_size"] != t_cfg["cap_feat_dim"]:
        size = {1024: " (Qwen3-0.6B, Anima's)", 4096: " (Qwen3-8B)"}.get(te_cfg["hidden_size"], "")
        raise InputError(text_encoder, f"text_encoder: has hidden size {te_cfg['hidden_size']}{size} but this Z-Image "
                                       f"transformer reads {t_cfg['cap_feat_dim']}-wide features (Qwen3-4B); choose "
                                       "qwen_3_4b.safetensors")
    if not vae:
        raise InputError(transformer, "is a Z-Image transformer without a VAE: choose the Flux VAE (ae.safetensors) "
                                      "in the vae field")
    try:
        v_shapes = read_shapes(vae, "vae") if os.path.isfile(vae) or not os.path.isdir(vae) else None
        if v_shapes is not None and any(k.endswith("encoder.downsamples.0.residual.0.gamma") for k in v_shapes):
            raise InputError(vae, "vae: is a Qwen-Image/Wan VAE (Anima's); Z-Image needs the Flux VAE: choose "
                                  "ae.safetensors")
        v_cfg = vae_config(v_shapes) if v_shapes is not None else \
            json.loads((Path(vae) / "config.json").read_text(encoding="utf-8"))
    except (KeyError, OSError, ValueError) as err:
        raise InputError(vae, "vae: is not a VAE file (no encoder/decoder weights); choose the Flux VAE "
                              "(ae.safetensors)") from err
    channels = int(v_cfg.get("latent_channels", 0))
    if channels != t_cfg["in_channels"]:
        raise InputError(vae, f"vae: has {channels} latent channels but Z-Image needs {t_cfg['in_channels']} "
                              "(the Flux VAE); choose ae.safetensors")
    return t_cfg, te_cfg, v_cfg


# -- tokenizer -----------------------------------------------------------------------------------------

def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES)


def tokenizer_candidates(*files: str) -> list[Path]:
    """Folders that may hold Qwen's tokenizer, in the order they are tried (without the HF cache)."""
    out: list[Path] = []
    for file in files:
        if file:
            here = Path(file).resolve().parent
            out += [here / "tokenizer", here / f"{Path(file).stem}_tokenizer"]
    for file in files:
        if file:
            for ancestor in Path(file).resolve().parents:
                out += [ancestor / rel for rel in _HOST_TOKENIZERS]
    return list(dict.fromkeys(out))


def hf_cached(repo: str, sub: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*" if sub else "*token*", "*vocab*", "*merges*"],
                                 local_files_only=True)
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not in the cache"
        return None
    folder = Path(root) / sub if sub else Path(root)
    return folder if has_tokenizer(folder) else None


def find_qwen_tokenizer(text_encoder: str, transformer: str = "") -> Path:
    """Where Qwen's tokenizer is, offline: a ``tokenizer/`` folder beside the text-encoder (or transformer)
    file, Forge Neo's or ComfyUI's copy above them, or the Hugging Face cache (local files only).

    Raises:
        InputError: none found; names the ``text_encoder`` field and where to put the files.
    """
    for folder in tokenizer_candidates(text_encoder, transformer):
        if has_tokenizer(folder):
            return folder
    for repo, sub in _HF_TOKENIZERS:
        found = hf_cached(repo, sub)
        if found is not None:
            return found
    beside = Path(text_encoder).resolve().parent / "tokenizer"
    raise InputError(text_encoder, f"text_encoder: no Qwen tokenizer found offline for this file; put Qwen3's "
                                   f"tokenizer files (tokenizer.json, or vocab.json + merges.txt) in {beside}")


# -- loading -------------------------------------------------------------------------------------------

def load_part(path: str, what: str, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from trainer.models.components import load_strict

    try:
        load_strict(model, state)
    except ValueError as err:
        raise InputError(path, f"{what}: weights do not fit the Z-Image architecture: {err}") from err


def load_zimage_files(transformer: str, text_encoder: str, vae: str, *,
                      dtype: torch.dtype | None = None) -> DiTParts:
    """Load the Z-Image single-file set (transformer, Qwen3 text encoder, VAE) offline.

    Args:
        transformer: the Z-Image transformer file (native names, bf16/fp16/fp32).
        text_encoder: the Qwen3-4B file (``qwen_3_4b.safetensors`` layout).
        vae: the Flux VAE file (``ae.safetensors``), or a diffusers VAE folder.
        dtype: cast the weights to this while reading.

    Raises:
        InputError: a missing, wrong or mismatched part, or no tokenizer; nothing is loaded then.
    """
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from trainer.models.checkpoint import read_state_dict
    from trainer.models.dit_loading import TURBO_NOTE
    from trainer.models.ldm import vae_from_ldm

    t_cfg, te_cfg, v_cfg = check_zimage_set(transformer, text_encoder, vae)
    tok_dir = find_qwen_tokenizer(text_encoder, transformer)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if len(tokenizer) > te_cfg["vocab_size"]:
        raise InputError(str(tok_dir), f"text_encoder: this tokenizer has {len(tokenizer)} tokens but the text encoder "
                                       f"only {te_cfg['vocab_size']}; it is not Qwen's: remove it or replace it")
    with torch.device("meta"):
        dit_model = ZImageTransformer2DModel(**t_cfg)
        te_model = Qwen3Model(Qwen3Config(**te_cfg))
        vae_model = AutoencoderKL(**v_cfg) if not os.path.isdir(vae) else None
    state = strip(read_state_dict(transformer, dtype)[0], DIT_PREFIXES)
    load_part(transformer, "model", dit_model, convert_z_image_transformer_checkpoint_to_diffusers(state))
    state = {k: v for k, v in strip(read_state_dict(text_encoder, dtype)[0], TE_PREFIXES).items() if k != "lm_head.weight"}
    load_part(text_encoder, "text_encoder", te_model, state)
    rebuild_rotary(te_model)
    if vae_model is None:
        vae_model = AutoencoderKL.from_pretrained(vae, local_files_only=True, **({"torch_dtype": dtype} if dtype else {}))
    else:
        state = read_state_dict(vae, dtype)[0]
        if any(k.startswith(("encoder.down.", "first_stage_model.", "vae.encoder.down.")) for k in state):
            state = vae_from_ldm(state, v_cfg)
        load_part(vae, "vae", vae_model, state)
    del state
    name = Path(transformer).stem
    turbo = "turbo" in name.lower()
    return DiTParts(Family.ZIMAGE, dit_model, te_model, tokenizer, vae_model, read_config("scheduler"), name,
                    turbo=turbo, notes=[TURBO_NOTE] if turbo else [])


def rebuild_rotary(model: nn.Module) -> None:
    """Qwen3's rotary table is a non-persistent buffer: built on meta, it is never loaded; build it here."""
    rotary = getattr(model, "rotary_emb", None)
    if rotary is not None and any(b.is_meta for b in rotary.buffers()):
        model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    assert not left, f"buffers left on meta: {left[:3]}"


# -- the inverse: write a part set as the files users keep (tests, and exporting the built-in) ---------

def zimage_to_native(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``ZImageTransformer2DModel`` parameters -> native (ComfyUI/Forge Neo) names, q/k/v fused."""
    renames = ((r"^all_final_layer\.2-1\.", "final_layer."), (r"^all_x_embedder\.2-1\.", "x_embedder."),
               (r"\.attention\.to_out\.0\.", ".attention.out."), (r"\.attention\.norm_q\.", ".attention.q_norm."),
               (r"\.attention\.norm_k\.", ".attention.k_norm."))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[key.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(parts, dim=0)
            continue
        for pattern, new in renames:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def save_zimage_files(parts: DiTParts, folder: str | Path, *, prefix: str = "", dtype: torch.dtype | None = None,
                      folders: tuple[str, str, str] = ("diffusion_models", "text_encoders", "vae"),
                      ) -> tuple[Path, Path, Path]:
    """Write a Z-Image part set as ComfyUI keeps it (``folders``; Forge Neo: ``Stable-diffusion``,
    ``text_encoder``, ``VAE``): ``<name>.safetensors`` (native names under ``prefix``),
    ``qwen_3_4b.safetensors`` (``model.``) with its ``tokenizer/`` beside it, and ``ae.safetensors`` (ldm
    names). Returns the three file paths."""
    from trainer.models.checkpoint import _atomic_save
    from trainer.models.ldm import VAE_PREFIX, vae_to_ldm

    def cast(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                for k, v in state.items()}

    root = Path(folder)
    paths = (root / folders[0] / f"{parts.name}.safetensors", root / folders[1] / "qwen_3_4b.safetensors",
             root / folders[2] / "ae.safetensors")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    native = zimage_to_native(parts.transformer.state_dict())
    _atomic_save(cast({prefix + k: v for k, v in native.items()}), paths[0], {})
    _atomic_save(cast({"model." + k: v for k, v in parts.text_encoder.state_dict().items()}), paths[1], {})
    parts.tokenizer.save_pretrained(paths[1].parent / "tokenizer")
    ldm = vae_to_ldm(parts.vae.state_dict(), dict(parts.vae.config))
    _atomic_save(cast({k.removeprefix(VAE_PREFIX): v for k, v in ldm.items()}), paths[2], {})
    return paths


def load_dit_file(model: str, vae: str, text_encoder: str, *, device: torch.device,
                  dtype: torch.dtype) -> Any:
    """A ``DiTBundle`` for a Z-Image or Anima transformer file with its text-encoder and VAE files; None for
    other files.

    Raises:
        InputError: see :func:`load_zimage_files` and ``anima_files.load_anima_files``.
    """
    from trainer.models.anima_files import is_anima, load_anima_files
    from trainer.models.dit import DiTBundle

    try:
        keys = read_shapes(model, "model")
    except InputError:
        return None  # not a readable safetensors file: the checkpoint loader names what it is
    if is_zimage(strip(keys, DIT_PREFIXES)):
        return DiTBundle(load_zimage_files(model, text_encoder, vae, dtype=dtype), device=device, dtype=dtype)
    if is_anima(keys):
        return DiTBundle(load_anima_files(model, text_encoder, vae, dtype=dtype), device=device, dtype=dtype)
    return None
