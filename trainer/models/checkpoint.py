"""Reading and writing models on disk, fully offline.

- ``save_single_file``: an ldm/sgm-layout ``.safetensors`` that A1111, Forge and diffusers load; our
  own metadata (``traintrain.family``, ``traintrain.configs``) lets non-standard (tiny) architectures
  rebuild exactly.
- ``load_single_file`` / ``load_diffusers_folder`` / ``load_vae``: strict loading into models built on
  the meta device from the shipped configs (``configs/``) or the file's metadata. Nothing is guessed
  from the Hub and nothing loads non-strictly.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.components import (
    TE_SLOTS,
    Components,
    build_empty,
    build_unet,
    compute_alphas_cumprod,
    fit_clip_keys,
    load_strict,
    read_config_dir,
    schedule_from_config,
    shipped_dir,
)
from trainer.models.detect import (
    NOT_A_CHECKPOINT,
    SUPPORTED,
    Prediction,
    detect_family,
    prediction_from_file,
    prediction_from_yaml,
    predicts_v,
    yaml_beside,
)
from trainer.models.ldm import (
    TE_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    components_to_ldm,
    te_from_ldm,
    unet_from_ldm,
    vae_from_ldm,
)
from trainer.models.tokenizer import MAX_LENGTH, PAD_CLIP, PAD_OPEN_CLIP, tokenizer_for
from trainer.paths import file_mode, temp_beside

META_FAMILY = "traintrain.family"
META_CONFIGS = "traintrain.configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
TOKENIZER_SLOTS = ("tokenizer", "tokenizer_2")
# Pad token per text encoder when a model brings no tokenizer: OpenAI CLIP pads with EOS, OpenCLIP with "!".
BUILTIN_PADS = {Family.SD1: (PAD_CLIP,), Family.SD2: (PAD_OPEN_CLIP,), Family.SDXL: (PAD_CLIP, PAD_OPEN_CLIP)}


def resolve_tokenizers(components: Components, where: str) -> list[Any]:
    """One tokenizer per text encoder: the model's own where it has one, else the built-in that fits.

    Raises:
        InputError: an encoder whose vocabulary fits no built-in tokenizer (``where`` names the model).
    """
    own = list(components.tokenizers or [])
    out = []
    for i, (te, pad) in enumerate(zip(components.text_encoders, BUILTIN_PADS[components.family], strict=True)):
        if i < len(own) and own[i] is not None:
            out.append(own[i])
            continue
        try:
            out.append(tokenizer_for(int(te.config.vocab_size), pad))
        except ValueError as err:
            raise InputError(where, f"{err}; this model brings no tokenizer of its own: use its diffusers folder "
                                    "(with tokenizer/) instead") from err
    return out


def read_state_dict(path: str | os.PathLike[str],
                    dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a ``.safetensors`` file (or a pickle-free ``.ckpt``/``.pt``) onto the CPU.

    Args:
        path: the file.
        dtype: cast floating-point tensors to this as they are read (an fp16/bf16 file trained in fp32,
            or an fp32 file trained in half precision, never holds both copies); None keeps them.

    Returns:
        (state dict, safetensors metadata; empty for pickles).

    Raises:
        InputError: unreadable, not a tensor file, or a pickle that needs code to load.
    """
    path = str(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        return {k: _cast(v, dtype) for k, v in _read_pickle(path).items()}, {}
    check_complete(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {k: _cast(handle.get_tensor(k), dtype) for k in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(path, f"{NOT_A_CHECKPOINT} (cannot be read as safetensors: {err})") from err


_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _incomplete(path: str, why: str) -> InputError:
    return InputError(path, f"is incomplete or corrupt ({why}), e.g. an interrupted download or copy; "
                            "download or copy it again, or choose another file")


def check_complete(path: str) -> None:
    """Refuse a truncated ``.safetensors`` file by its own header, before any guess at what it is.

    The header (8-byte length, then JSON naming each tensor's byte range) says how long the file must
    be; a cut-off download is shorter. Files that are not safetensors at all pass (the reader names them).

    Raises:
        InputError: the file is shorter than its header says, or its header is cut off or unreadable.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(9)
            if len(head) < 9:
                raise _incomplete(path, f"only {size} bytes")
            if head[8:9] != b"{":
                return  # not safetensors: left to the reader's message
            length = int.from_bytes(head[:8], "little")
            if length > _MAX_HEADER:
                return  # no safetensors header is this long (random bytes): left to the reader
            if length > size - 8:
                raise _incomplete(path, f"{size:,} bytes, cut off inside its {length:,}-byte header")
            handle.seek(8)
            header = json.loads(handle.read(length))
    except OSError:
        return  # unreadable: the reader says so with the operating system's reason
    except (ValueError, UnicodeDecodeError) as err:
        raise _incomplete(path, f"its header is not valid JSON: {err}") from err
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise _incomplete(path, f"{size:,} of {needed:,} bytes")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(path, "is not a tensor file that loads without running pickled code (which we never do); "
                               "choose a .safetensors checkpoint or convert this one to .safetensors") from err
    except (RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError, TypeError, struct.error) as err:
        # the safe unpickler reports text or random bytes with IndexError/KeyError ("pop from empty list")
        reason = " ".join(str(err).split())[:200]  # one line: torch's messages span several
        if _is_cut_zip(path):
            raise _incomplete(path, "a zip checkpoint whose end is missing") from err
        raise InputError(path, f"{NOT_A_CHECKPOINT} (cannot be read: {type(err).__name__}: {reason})") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise InputError(path, NOT_A_CHECKPOINT)
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _is_cut_zip(path: str) -> bool:
    """A torch zip checkpoint whose end (the zip directory) is missing: the first bytes are a zip's."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _atomic_save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` to a temp file in the same folder, fsync, rename (never half-written)."""
    from safetensors.torch import save_file

    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        if os.name == "posix":  # save_file recreates the file: give it the umask's mode again
            os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_single_file(components: Components, path: str | os.PathLike[str], family: Family | None = None) -> Path:
    """Write a model as one ldm/sgm-layout ``.safetensors`` file (atomically).

    Args:
        components: the model (e.g. ``bundle.components`` or ``build_builtin(...)``).
        path: target file.
        family: defaults to ``components.family``.

    Returns:
        The written path.
    """
    family = family or components.family
    state = components_to_ldm(family, components.unet, components.vae, components.text_encoders)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if components.v_pred:
        state["v_pred"] = torch.tensor([])  # the marker v-prediction fine-tunes carry; read by A1111/Forge too
    if components.zero_snr:
        state["ztsnr"] = torch.tensor([])  # read by Forge/ComfyUI next to v_pred
    configs: dict[str, Any] = {**components.configs(), "scheduler": components.scheduler}
    metadata = {META_FAMILY: family.value, META_CONFIGS: json.dumps(configs), "traintrain.name": components.name,
                "modelspec.prediction_type": "v" if components.v_pred else "epsilon"}
    target = Path(path)
    _atomic_save(state, target, metadata)
    return target


def save_diffusers_folder(components: Components, folder: str | os.PathLike[str]) -> Path:
    """Write a model as a diffusers folder (``save_pretrained`` of each part + model_index + scheduler)."""
    root = Path(folder)
    components.unet.save_pretrained(root / "unet")
    components.vae.save_pretrained(root / "vae")
    for slot, te in zip(TE_SLOTS, components.text_encoders, strict=False):
        te.save_pretrained(root / slot)
    for slot, tokenizer in zip(TOKENIZER_SLOTS, resolve_tokenizers(components, str(root)), strict=False):
        tokenizer.save_pretrained(str(root / slot))
        _write_bpe_files(root / slot)
    sched = {"_class_name": "DDPMScheduler", **components.scheduler}
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
    pipe = "StableDiffusionXLPipeline" if components.family is Family.SDXL else "StableDiffusionPipeline"
    index = {"_class_name": pipe, "_traintrain_family": components.family.value,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    for slot, te in zip(TE_SLOTS, components.text_encoders, strict=False):
        index[slot] = ["transformers", type(te).__name__]
    for slot in TOKENIZER_SLOTS[: len(components.text_encoders)]:
        index[slot] = ["transformers", "CLIPTokenizer"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return root


def _write_bpe_files(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``: transformers 5 writes only the latter, and
    the slow ``CLIPTokenizer`` of transformers 4.x (A1111/Forge environments) reads only the former."""
    source = folder / "tokenizer.json"
    if (folder / "vocab.json").is_file() or not source.is_file():
        return
    model = json.loads(source.read_text(encoding="utf-8")).get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "vocab.json").write_text(json.dumps(model.get("vocab", {}), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def load_single_file(path: str, *, use_ema: bool = False, dtype: torch.dtype | None = None) -> Components:
    """Load an SD1/SD2/SDXL single-file checkpoint (VAE may be absent: ``vae`` is then None).

    Args:
        path: ``.safetensors`` (or a pickle-free ``.ckpt``): fp32, fp16 or bf16, pruned or with EMA.
        use_ema: train on the EMA U-Net (``model_ema.*``) when the file has one; a note says when not.
        dtype: cast the weights to this while reading (None keeps the file's dtype).

    Raises:
        InputError: not a checkpoint, an unsupported family (named), or weights that do not fit.
    """
    state, metadata = read_state_dict(path, dtype)
    own = json.loads(metadata[META_CONFIGS]) if META_CONFIGS in metadata else None
    family = detect_family(path, state, metadata.get(META_FAMILY) if own else None)
    configs = own or read_config_dir(shipped_dir(family))
    said = _prediction(path, state, metadata)
    state, notes = pick_unet_weights(path, state, use_ema)
    unet, vae, tes = build_empty(configs)
    _load_part(path, "U-Net", family, unet, unet_from_ldm, state, configs["unet"])
    has_vae = any(k.startswith(VAE_PREFIX) for k in state)
    if has_vae:
        _load_part(path, "VAE", family, vae, vae_from_ldm, state, configs["vae"])
    for te, (prefix, is_open) in zip(tes, TE_PREFIXES[family], strict=True):
        if not any(k.startswith(prefix) for k in state):
            raise InputError(path, f"has no text encoder weights under '{prefix}'; choose a complete {family.value} checkpoint")
        _load_part(path, "text encoder", family, te, _te_state, state, prefix, is_open, te)
    del state  # the parts hold their own tensors now
    scheduler = schedule_from_config((own or {}).get("scheduler") or configs.get("scheduler") or {})
    v_pred = said.v_pred
    if v_pred is None:
        v_pred = scheduler["prediction_type"] == "v_prediction" if own is not None else (
            family is Family.SD2 and predicts_v(unet))
        if v_pred and own is None:
            notes.append("v-prediction detected from the SD2 U-Net's output (no marker, metadata or .yaml says so)")
    if v_pred and family is Family.SD2 and own is None:
        unet = _rebuild_unet(read_config_dir(shipped_dir(family, v_pred=True))["unet"], unet)
    zero_snr = bool(said.zero_snr) or bool(scheduler.get("rescale_betas_zero_snr"))
    if said.source and (v_pred or zero_snr):
        kinds = " and ".join(k for k, on in (("v-prediction", v_pred), ("zero-terminal SNR", zero_snr)) if on)
        notes.append(f"{kinds} from {said.source}")
    scheduler.update(prediction_type="v_prediction" if v_pred else "epsilon", rescale_betas_zero_snr=zero_snr)
    return Components(family, unet, vae if has_vae else None, tes, v_pred=v_pred, scheduler=scheduler,
                      name=Path(path).stem, vae_config=configs["vae"], notes=notes)


def _prediction(path: str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Prediction:
    """A ``.yaml`` beside the file decides v-prediction (as in A1111); marker keys and metadata fill in."""
    in_file = prediction_from_file(state, metadata)
    beside = yaml_beside(path)
    if beside is None:
        return in_file
    config = prediction_from_yaml(beside)
    if config.zero_snr or not in_file.zero_snr:
        return config
    return Prediction(config.v_pred, True, f"{config.source} and the file's zero-SNR marker")


def pick_unet_weights(path: str, state: dict[str, torch.Tensor], use_ema: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The regular U-Net weights, or with ``use_ema`` the EMA copy a full checkpoint carries.

    ldm's EMA stores each U-Net parameter as ``model_ema.<name without dots>`` (``model.diffusion_model.
    input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``) plus ``decay`` and
    ``num_updates``; pruned files drop them. The Web-UIs load the regular weights.

    Returns:
        (state dict whose ``model.diffusion_model.*`` are the chosen weights, notes for the user).

    Raises:
        InputError: ``use_ema`` and the EMA copy does not cover every U-Net weight.
    """
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING}
    if not use_ema:
        return state, ["the file carries EMA weights: training the regular ones (tick model_use_ema for the EMA copy)"] if ema else []
    if not ema:
        return state, ["model_use_ema: this file carries no EMA weights (a pruned checkpoint); training its regular weights"]
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    flat = {k: k.removeprefix("model.").replace(".", "") for k in unet_keys}
    if len(set(flat.values())) != len(flat):
        raise InputError(path, "model_use_ema: the EMA names of this U-Net are ambiguous; untick model_use_ema")
    missing = [k for k in unet_keys if flat[k] not in ema]
    if missing:
        raise InputError(path, f"model_use_ema: the EMA weights miss {len(missing)} U-Net weights (e.g. {missing[0]}); "
                               "untick model_use_ema to train the regular weights")
    chosen = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    chosen.update({k: ema[flat[k]] for k in unet_keys})
    return chosen, [f"model_use_ema: training the EMA U-Net ({len(unet_keys)} weights from model_ema.*)"]


def _rebuild_unet(config: dict[str, Any], loaded: nn.Module) -> nn.Module:
    """Same weights in a U-Net built from another config (SD2 768-v upcasts attention)."""
    with torch.device("meta"):
        unet = build_unet(config)
    load_strict(unet, dict(loaded.state_dict()))
    return unet


def _te_state(state: dict[str, torch.Tensor], prefix: str, is_open: bool, te: nn.Module) -> dict[str, torch.Tensor]:
    return fit_clip_keys(te_from_ldm(state, prefix, is_open, te), te)


def _load_part(path: str, what: str, family: Family, model: nn.Module, convert: Any, *args: Any) -> None:
    """Convert and strictly load one part; any mismatch becomes an InputError naming the part."""
    try:
        load_strict(model, convert(*args))
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        raise InputError(path, f"{what} weights do not fit the {family.value} architecture: {err}") from err


def load_diffusers_folder(path: str, *, use_ema: bool = False, dtype: torch.dtype | None = None) -> Components:
    """Load an SD1/SD2/SDXL diffusers folder offline: its own tokenizer(s) and scheduler config decide.

    Weights may be ``*.safetensors``, ``*.fp16.safetensors`` variants or ``*.bin``. With ``use_ema`` a
    ``unet_ema/`` folder (what diffusers' training scripts save) replaces ``unet/``.

    Raises:
        InputError: not a diffusers folder, an unsupported family (named), or a part that does not load.
    """
    root = Path(path)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise InputError(path, "is not a diffusers model folder (needs model_index.json); "
                               "choose a .safetensors checkpoint or a diffusers folder")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(str(index_path), f"cannot be read as JSON ({err}); fix or replace the file") from err
    configs = read_config_dir(root)
    family = folder_family(path, index, configs)
    scheduler = _folder_schedule(root, configs.get("scheduler", {}))
    unet_dir, notes = root / "unet", []
    if use_ema and (root / "unet_ema").is_dir():
        unet_dir = root / "unet_ema"
        notes.append("model_use_ema: training the EMA U-Net of unet_ema/")
    elif use_ema:
        notes.append("model_use_ema: this folder has no unet_ema/; training unet/")
    unet, vae, tes = _folder_parts(path, root, unet_dir, dtype)
    tokenizers = [load_folder_tokenizer(root / slot, te) if (root / slot).is_dir() else None
                  for slot, te in zip(TOKENIZER_SLOTS, tes, strict=False)]
    v_pred, zero_snr = scheduler["prediction_type"] == "v_prediction", bool(scheduler["rescale_betas_zero_snr"])
    if v_pred or zero_snr:
        kinds = " and ".join(k for k, on in (("v-prediction", v_pred), ("zero-terminal SNR", zero_snr)) if on)
        notes.append(f"{kinds} from scheduler/scheduler_config.json")
    return Components(family, unet, vae, tes, v_pred=v_pred, scheduler=scheduler, name=root.name,
                      tokenizers=tokenizers if any(t is not None for t in tokenizers) else None, notes=notes)


def _folder_schedule(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The folder's scheduler config as our schedule; refuse what we cannot train against."""
    scheduler = schedule_from_config(config)
    where = str(root / "scheduler" / "scheduler_config.json")
    if scheduler["prediction_type"] not in ("epsilon", "v_prediction"):
        raise InputError(where, f"prediction_type '{scheduler['prediction_type']}' is not supported "
                                "(epsilon or v_prediction); fix the file")
    try:
        compute_alphas_cumprod(scheduler)
    except ValueError as err:
        raise InputError(where, f"{err}; fix the file") from err
    return scheduler


def _folder_parts(path: str, root: Path, unet_dir: Path,
                  dtype: torch.dtype | None) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    try:
        unet = _from_pretrained(UNet2DConditionModel, unet_dir, dtype)
        vae = _from_pretrained(AutoencoderKL, root / "vae", dtype)
        tes = [_from_pretrained(CLIPTextModelWithProjection if slot == "text_encoder_2" else CLIPTextModel, root / slot, dtype)
               for slot in TE_SLOTS if (root / slot).is_dir()]
    except (OSError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise InputError(path, f"a part of the diffusers folder does not load: {reason}") from err
    return unet, vae, tes


def _from_pretrained(cls: Any, folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load one part offline: its regular weights, else the fp16 variant (Hub folders often carry only that)."""
    if not folder.is_dir():
        raise OSError(f"{folder.name}/ is missing")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    weights = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if weights and all(".fp16." in name for name in weights):
        kwargs["variant"] = "fp16"
    return cls.from_pretrained(str(folder), **kwargs)


def load_folder_tokenizer(folder: Path, text_encoder: nn.Module) -> Any:
    """A diffusers folder's own CLIP tokenizer (offline), checked against its text encoder.

    Its own special tokens are kept: SD1 pads with ``<|endoftext|>``, OpenCLIP encoders with ``!``.

    Raises:
        InputError: it does not load, lacks BOS/EOS/pad, or emits ids the text encoder does not have.
    """
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise InputError(str(folder), f"the tokenizer does not load ({reason}); it needs vocab.json and merges.txt") from err
    if not tokenizer.model_max_length or tokenizer.model_max_length > MAX_LENGTH:
        tokenizer.model_max_length = MAX_LENGTH  # configs without a limit give 1e30; CLIP encoders take 77
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    if None in special.values():
        missing = ", ".join(k for k, v in special.items() if v is None)
        raise InputError(str(folder), f"the tokenizer has no {missing} token; add it to tokenizer_config.json")
    vocab = int(text_encoder.config.vocab_size)
    if len(tokenizer) > vocab:
        raise InputError(str(folder), f"the tokenizer has {len(tokenizer)} tokens but its text encoder only {vocab}; "
                                      "the folder's tokenizer and text encoder do not belong together")
    return tokenizer


# model_index class names of families we cannot train, as users call them
_UNSUPPORTED_PIPELINES = (("Flux", "a Flux model"), ("StableDiffusion3", "an SD3/SD3.5 model"),
                          ("Inpaint", "an inpainting model"), ("InstructPix2Pix", "an InstructPix2Pix model"),
                          ("Cascade", "a Stable Cascade model"), ("PixArt", "a PixArt model"),
                          ("Kandinsky", "a Kandinsky model"), ("Upscale", "an upscaler model"))


def folder_family(path: str, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Family:
    """SD1/SD2/SDXL from ``model_index.json`` and the part configs; anything else is named and refused.

    Raises:
        InputError: another family, or a folder without a U-Net or text encoder.
    """
    name = str(index.get("_class_name", ""))
    for marker, what in _UNSUPPORTED_PIPELINES:
        if marker in name:
            raise InputError(path, f"is {what} ({name}), which is not supported yet; {SUPPORTED}")
    if "unet" not in configs:
        what = "a transformer (DiT) model" if "transformer" in index else f"not an SD model ({name or 'no unet/'})"
        raise InputError(path, f"has no unet/config.json: {what}, which is not supported; {SUPPORTED}")
    channels = int(configs["unet"].get("in_channels", 4))
    if channels != 4:
        what = {9: "an inpainting model", 8: "an InstructPix2Pix model"}.get(channels, f"a {channels}-channel U-Net")
        raise InputError(path, f"is {what} (U-Net in_channels {channels}), which is not supported yet; {SUPPORTED}")
    if "text_encoder" not in configs:
        what = "an SDXL refiner (only text_encoder_2)" if "text_encoder_2" in configs else "a folder without text_encoder/"
        raise InputError(path, f"is {what}, which is not supported; {SUPPORTED}")
    if "_traintrain_family" in index:
        return Family(index["_traintrain_family"])
    if "text_encoder_2" in configs:
        return Family.SDXL
    return Family.SD2 if configs["text_encoder"].get("hidden_size") == 1024 else Family.SD1


def load_vae(path: str, config: dict[str, Any], family: Family) -> nn.Module:
    """Load a VAE file or diffusers VAE folder STRICTLY into the model's VAE architecture.

    Args:
        path: ``.safetensors``/``.pt`` in ldm (``encoder.down.0...``, optionally ``first_stage_model.``)
            or diffusers layout, or a folder with ``config.json``.
        config: the model's VAE config (the replacement must have exactly this architecture).
        family: for messages.

    Raises:
        InputError: not a VAE, or a VAE of another shape; the message names the ``vae`` field.
    """
    from diffusers import AutoencoderKL

    fix = f"choose a VAE made for {family.value} models, or leave vae empty to use the checkpoint's own"
    if os.path.isdir(path):
        weights = [p for p in Path(path).glob("*.safetensors")]
        if not weights:
            raise InputError(path, f"vae: the folder has no .safetensors weights; {fix}")
        state, _ = read_state_dict(str(weights[0]))
    else:
        state, _ = read_state_dict(path)
    if any(".down_blocks." in k for k in state):
        bare = {k.split("vae.", 1)[-1] if k.startswith("vae.") else k: v for k, v in state.items()}
    elif any(k.startswith(("encoder.down.", VAE_PREFIX + "encoder.down.")) for k in state):
        bare = vae_from_ldm(state, config)
    else:
        raise InputError(path, f"vae: is not a VAE file (no encoder/decoder weights); {fix}")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    try:
        load_strict(vae, bare)
    except ValueError as err:
        raise InputError(path, f"vae: does not fit this {family.value} model's VAE ({err}); {fix}") from err
    return vae
