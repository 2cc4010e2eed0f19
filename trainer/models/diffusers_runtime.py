"""The standalone model runtime: ``load_bundle`` and ``DiffusersBundle`` (the ModelBundle on diffusers).

Prompts are encoded as inference does: SD1/SD2 take the last hidden state after the final norm of
their encoder (SD2's shipped encoder has 23 of OpenCLIP's 24 layers, i.e. the penultimate layer), or with
``clip_skip`` N the N-th from the end through the final norm (kohya, A1111's "Clip skip"), SDXL
concatenates the penultimate hidden states of both encoders and adds TE2's pooled projection. Prompts
longer than 75 tokens are split into 75-token chunks, each framed as BOS + tokens + EOS + pad (77), and
concatenated like A1111; a batch is padded to its longest prompt with empty chunks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import InputError, MissingPackage, SettingsError, TrainTrainError
from trainer.models.bundle import Cond, Family, UNetShape
from trainer.models.checkpoint import resolve_tokenizers
from trainer.models.components import Components, compute_alphas_cumprod
from trainer.models.ldm import unet_shape

CHUNK_TOKENS = 75


def pick_device(preference: str | torch.device | None = None) -> torch.device:
    """The given device, else cuda -> mps -> cpu."""
    if preference is not None:
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sample_latent(dist: Any, generator: torch.Generator | None = None) -> torch.Tensor:
    """mean + std · ε of a VAE's latent distribution with ε drawn in float32, whatever the VAE's dtype.

    diffusers draws ε in the VAE's dtype, and torch's bf16/fp16 ``randn`` is a different stream from its
    float32 one (torch 2.11 on CPU: a bf16 VAE then encodes a different sample, 135% away, not a rounded
    one). Drawn in float32 the precision only rounds; in float32 this is diffusers' draw bit for bit.
    """
    mean, std = dist.mean.float(), dist.std.float()
    where = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=where, dtype=torch.float32)
    return mean + std * eps.to(mean.device)


class DiffusersBundle:
    """A diffusers model ready for adapter training (implements ``ModelBundle``).

    Args:
        components: the loaded parts (kept as ``self.components`` for saving).
        device: where training runs.
        dtype: dtype of the frozen weights; ``torch.int8`` quantises U-Net linears to weight-only int8
            (torchao) and computes in bfloat16.
    """

    layout = "diffusers"

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype) -> None:
        self.components = components
        self.family: Family = components.family
        self.v_pred: bool = components.v_pred
        self.name: str = components.name
        self.device = device
        quantise = dtype == torch.int8
        self.dtype: torch.dtype = torch.bfloat16 if quantise else dtype
        self.unet: nn.Module = components.unet
        self.vae: nn.Module = components.vae
        self.unet_shape: UNetShape = unet_shape(dict(self.unet.config))
        self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.alphas_cumprod = compute_alphas_cumprod(components.scheduler).to(device)
        # kohya's clip_skip (1 = last layer) for SD1/SD2; SDXL has fixed layers, so None (set_clip_skip)
        self.clip_skip: int | None = None if components.family is Family.SDXL else 1
        self.zero_snr: bool = components.zero_snr
        self.notes: list[str] = list(components.notes)
        tes = components.text_encoders
        keys = ("lora_te",) if len(tes) == 1 else ("lora_te1", "lora_te2")
        self.text_encoders: dict[str, nn.Module] = dict(zip(keys, tes, strict=True))
        # the model's own tokenizers (a diffusers folder), else the built-in CLIP one that fits
        self.tokenizers = resolve_tokenizers(components, components.name)
        # SDXL's VAE overflows in fp16 (config force_upcast): keep it in float32 then
        upcast = self.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        self.vae_dtype = torch.float32 if upcast else self.dtype
        for module in (self.unet, *tes):
            _freeze(module, device, self.dtype)
        _freeze(self.vae, device, self.vae_dtype)
        self._vae_loaded: dict[str, torch.Tensor] | None = None  # the VAE as loaded, once set_vae_precision casts it
        if quantise:
            _quantise_int8(self.unet)

    # -- text ---------------------------------------------------------------------------------------
    def _chunk_ids(self, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """(B, n_chunks * 77) ids: 75-token chunks, each BOS + tokens + EOS + pad; short rows get empty chunks."""
        raw = [tokenizer(p, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] for p in prompts]
        chunks = [[ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]] for ids in raw]
        count = max(len(c) for c in chunks)
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = []
        for row in chunks:
            row = row + [[]] * (count - len(row))
            rows.append([t for c in row for t in [bos, *c, eos] + [pad] * (CHUNK_TOKENS - len(c))])
        return torch.tensor(rows, dtype=torch.long)

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Encode prompts as inference does (gradients flow when TE adapters train).

        Returns:
            ``Cond`` with context (B, 77 * chunks, D) and, for SDXL, pooled (B, P) from the first chunk.
        """
        encoders = list(self.text_encoders.values())
        ids = [self._chunk_ids(tok, prompts) for tok in self.tokenizers]
        count = max(i.shape[1] for i in ids) // 77
        batch = len(prompts)
        states, pooled = [], None
        for te, row_ids in zip(encoders, ids, strict=True):
            te_device = next(te.parameters()).device
            flat = row_ids.view(batch * count, 77).to(te_device)
            if self.family is Family.SDXL:
                out = te(flat, output_hidden_states=True)
                hidden = out.hidden_states[-2]
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds.view(batch, count, -1)[:, 0]
            elif self.clip_skip is not None and self.clip_skip > 1:
                # kohya / A1111 "Clip skip": the N-th hidden state from the end, through the final layer norm
                out = te(flat, output_hidden_states=True)
                hidden = getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-self.clip_skip])
            else:
                hidden = te(flat).last_hidden_state
            states.append(hidden.reshape(batch, count * 77, -1).to(self.device))
        context = torch.cat(states, dim=-1)
        return Cond(context, None if pooled is None else pooled.to(self.device))

    # -- images ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latent samples (B, C, H/8, W/8), float32, on ``device``."""
        vae_device = next(self.vae.parameters()).device
        dist = self.vae.encode(pixels.to(vae_device, self.vae_dtype)).latent_dist
        sample = sample_latent(dist, generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = (sample.float() - shift) * float(self.vae.config.scaling_factor)
        return latents.to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1], float32, on ``device`` (previews). A VAE offloaded to the
        CPU decodes on the training device for this call and goes back afterwards."""
        home = next(self.vae.parameters()).device
        if home != self.device:
            nn.Module.to(self.vae, self.device)
        try:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            z = latents.float() / float(self.vae.config.scaling_factor) + shift
            pixels = self.vae.decode(z.to(self.device, self.vae_dtype)).sample
        finally:
            if home != self.device:
                nn.Module.to(self.vae, home)
        return pixels.float().clamp(-1, 1)

    # -- denoiser -------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Run the U-Net; returns float32. SDXL size conditioning (``time_ids``) is ``cond.size`` (each
        sample's original size, crop and bucket), else the pixel size of ``noisy`` as an uncropped image
        ([h, w, 0, 0, h, w] with h, w = latent size x vae_scale_factor)."""
        added = None
        if self.family is Family.SDXL:
            assert cond.pooled is not None, "SDXL needs a pooled text embedding"
            if cond.size is not None:
                time_ids = cond.size.to(self.device, self.dtype)
            else:
                h, w = (s * self.vae_scale_factor for s in noisy.shape[-2:])
                time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=self.dtype).expand(noisy.shape[0], 6)
            added = {"text_embeds": cond.pooled.to(self.device, self.dtype), "time_ids": time_ids}
        compiled = getattr(self, "_compiled", None)
        unet = self.unet if compiled is None else compiled
        out = unet(noisy.to(self.device, self.dtype), timesteps.to(self.device),
                        encoder_hidden_states=cond.context.to(self.device, self.dtype),
                        added_cond_kwargs=added, return_dict=False)[0]
        return out.float()

    def set_clip_skip(self, layers: int) -> str | None:
        """``clip_skip`` (kohya: 1 = the encoder's last layer, 2 = the penultimate, …) for SD1/SD2; returns
        None, or why it does not apply (SDXL always takes both encoders' penultimate layers).

        Raises:
            SettingsError: more layers skipped than the text encoder has.
        """
        if self.family is Family.SDXL:
            self.clip_skip = None
            return None if layers == 1 else f"clip_skip {layers} is not used: SDXL takes fixed encoder layers (as kohya)"
        depth = int(next(iter(self.text_encoders.values())).config.num_hidden_layers)
        if not 1 <= layers <= depth:
            raise SettingsError("clip_skip", f"{layers} is outside 1..{depth} (this text encoder has {depth} layers); use 1 or 2")
        self.clip_skip = int(layers)
        return None

    def set_compile(self, enabled: bool) -> str | None:
        """``train_compile``: None, or why the U-Net stays uncompiled.

        Refused for now: with the adapters patched into module forwards, ``torch.compile`` (torch 2.13,
        CPU, tiny-sd1) ran, but its adapter gradients did not match eager ones (and the first step took
        125 s to compile), so compiling would silently train something else.
        """
        self._compiled = None
        if not enabled:
            return None
        version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        if not hasattr(torch, "compile") or version < (2, 1):
            return f"train_compile needs torch 2.1 or newer (this is {torch.__version__}); training uncompiled"
        if os.name == "nt":
            return "train_compile is not supported on Windows (no Triton); training uncompiled"
        return ("train_compile is not supported with patched adapters yet (compiled gradients differ from eager); "
                "training uncompiled")

    def set_vae_precision(self, dtype: torch.dtype) -> None:
        """``train_VAE_precision``: the VAE's dtype for encoding images (and decoding previews).

        Set every job (the host reuses a cached bundle between jobs). The weights are always cast from the
        ones loaded: a bf16 job would otherwise leave rounded weights behind for the next fp32 job, so the
        loaded VAE is kept on the CPU at the first change. fp32 here cannot bring back what an fp16 load
        rounded away.
        """
        if dtype == self.vae_dtype:
            return
        if self._vae_loaded is None:
            self._vae_loaded = {k: v.detach().to("cpu", copy=True) for k, v in self.vae.state_dict().items()}
        self.vae_dtype = dtype
        nn.Module.to(self.vae, dtype=dtype)  # diffusers' own .to() warns about fp32 modules
        self.vae.load_state_dict(self._vae_loaded)  # copies round the loaded weights once, into dtype

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant activation checkpointing of the U-Net blocks (reentrant breaks LoRA grads)."""
        if enabled:
            try:
                self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_non_reentrant)
            except TypeError:  # diffusers < 0.32 takes no function and already checkpoints non-reentrantly,
                self.unet.enable_gradient_checkpointing()  # but only in train mode (no dropout in SD U-Nets)
                self.unet.train()
        else:
            self.unet.disable_gradient_checkpointing()
            self.unet.eval()

    def offload(self, *parts: str) -> None:
        """Move ``"vae"`` and/or ``"text_encoders"`` to the CPU.

        Raises:
            ValueError: an unknown part name.
        """
        for part in parts:
            if part == "vae":
                self.vae.to("cpu")
            elif part == "text_encoders":
                for te in self.text_encoders.values():
                    te.to("cpu")
            else:
                raise ValueError(f"unknown part '{part}' (vae, text_encoders)")


def _checkpoint_non_reentrant(module: nn.Module, *args: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module.__call__, *args, use_reentrant=False)


def _freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen weights: no grad, eval mode, on ``device`` in ``dtype`` (SDPA attention is diffusers' default)."""
    module.requires_grad_(False)
    module.eval()
    nn.Module.to(module, device=device, dtype=dtype)  # diffusers' own .to() warns about fp32 modules


def _quantise_int8(unet: nn.Module) -> None:
    """Weight-only int8 U-Net linears through torchao."""
    try:
        from torchao.quantization import quantize_
    except ImportError as err:
        raise MissingPackage("torchao", "train_model_precision 'int8'") from err
    try:
        from torchao.quantization import Int8WeightOnlyConfig

        config: Any = Int8WeightOnlyConfig()
    except ImportError:  # torchao < 0.9 names it as a function
        from torchao.quantization import int8_weight_only

        config = int8_weight_only()
    quantize_(unet, config)


def load_bundle(model: str, vae: str | None = None, *, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, v_pred: bool | None = None,
                use_ema: bool = False, text_encoder: str | None = None) -> DiffusersBundle:
    """Load a model for training, fully offline.

    Args:
        model: a built-in name (``tiny-sd1``, ``tiny-sd2v``, ``tiny-sdxl``, ``small-sd1``, ``sd15-random``,
            ``sdxl-random``), a single-file checkpoint (``.safetensors`` in fp32/fp16/bf16, pruned or with
            EMA; ``.ckpt``/``.pt`` only if they load with ``weights_only=True``) or a diffusers folder
            (its own tokenizers and scheduler config are used).
        vae: optional VAE file or folder that replaces the model's VAE (strictly).
        device: where to train; None picks cuda -> mps -> cpu.
        dtype: frozen-weight dtype (float32, float16, bfloat16, or int8 for torchao weight-only int8).
        v_pred: force v-prediction on or off; None uses what the model says (a ``.yaml`` beside the
            file, marker keys, metadata, the scheduler config, or the SD2 probe).
        use_ema: train on the EMA U-Net a full checkpoint (``model_ema.*``) or folder (``unet_ema/``)
            carries; a note says when there is none.
        text_encoder: the Qwen3 text-encoder file a Z-Image transformer file needs (``text_encoder`` field).

    Returns:
        A ``DiffusersBundle``; ``notes`` says what was detected or chosen.

    Raises:
        InputError: missing path, not a checkpoint, unsupported family (named), unfitting VAE or tokenizer.
        MissingPackage: int8 without torchao.
    """
    try:
        return _load(model, vae, device=device, dtype=dtype, v_pred=v_pred, use_ema=use_ema, text_encoder=text_encoder)
    except TrainTrainError as err:
        # The traceback's frames hold the half-loaded parts: drop them so nothing stays in memory while
        # the caller keeps the error (a UI shows it, a queue records it).
        err.__cause__ = err.__context__ = None
        raise err.with_traceback(None) from None


def _load(model: str, vae: str | None, *, device: torch.device | str | None, dtype: torch.dtype,
          v_pred: bool | None, use_ema: bool, text_encoder: str | None = None) -> DiffusersBundle:
    from trainer.models.checkpoint import load_diffusers_folder, load_single_file, load_vae
    from trainer.models.tiny import BUILTIN_NAMES, build_builtin

    target = pick_device(device)
    if dtype == torch.int8:
        _quantise_int8_available()
    load_dtype = torch.bfloat16 if dtype == torch.int8 else dtype
    from trainer.models.tiny_dit import TINY_DIT_NAMES, build_tiny_dit

    if model in TINY_DIT_NAMES:
        from trainer.models.dit import DiTBundle

        if vae:
            raise InputError(vae, f"{model} is a built-in model with its own VAE; leave the vae field empty")
        if text_encoder:
            raise InputError(text_encoder, f"text_encoder: {model} is a built-in model with its own text encoder; "
                                           "leave the text_encoder field empty")
        return DiTBundle(build_tiny_dit(model), device=target, dtype=load_dtype)  # type: ignore[return-value]
    if os.path.isfile(model) and model.lower().endswith(".safetensors"):
        from trainer.models.dit_files import load_dit_file

        dit = load_dit_file(model, vae or "", text_encoder or "", device=target, dtype=load_dtype)
        if dit is not None:
            return dit  # type: ignore[return-value]
    if text_encoder:
        raise InputError(text_encoder, "text_encoder: only a Z-Image transformer file takes a separate text encoder "
                                       f"file; leave the field empty for {Path(model).name or model}")
    if model in BUILTIN_NAMES:
        parts = build_builtin(model, device=target, dtype=load_dtype)
    elif os.path.isdir(model):
        dit = _dit_folder(model, vae, target, load_dtype)
        if dit is not None:
            return dit  # type: ignore[return-value]
        parts = load_diffusers_folder(model, use_ema=use_ema, dtype=load_dtype)
    elif os.path.isfile(model):
        parts = load_single_file(model, use_ema=use_ema, dtype=load_dtype)
    else:
        raise InputError(model, f"not found; give a built-in name ({', '.join(BUILTIN_NAMES)}), "
                                "a .safetensors checkpoint or a diffusers folder")
    if vae:
        parts.vae = load_vae(vae, parts.configs()["vae"], parts.family)
    if parts.vae is None:
        raise InputError(model, "has no VAE weights (a checkpoint without a baked VAE); choose a VAE file in the vae field")
    if v_pred is not None and v_pred != parts.v_pred:
        parts.notes.append(f"model_v_pred: training as {'v' if v_pred else 'epsilon'}-prediction "
                           f"(the model says {'v' if parts.v_pred else 'epsilon'})")
    if v_pred is not None:
        parts.v_pred = v_pred
        parts.scheduler = {**parts.scheduler, "prediction_type": "v_prediction" if v_pred else "epsilon"}
    if parts.name == "model":
        parts.name = Path(model).stem
    return DiffusersBundle(parts, device=target, dtype=dtype)


def _dit_folder(model: str, vae: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """A DiTBundle for a Z-Image folder; refuses next-release DiT folders; None for SD folders."""
    import json

    from trainer.models.dit import DiTBundle
    from trainer.models.dit_loading import dit_pipeline, load_dit_folder, refuse_next_release

    index_path = Path(model) / "model_index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the SD loader names the broken file
    refuse_next_release(model, index)
    if dit_pipeline(index) is None:
        return None
    return DiTBundle(load_dit_folder(model, dtype=dtype, vae=vae or ""), device=device, dtype=dtype)


def _quantise_int8_available() -> None:
    """Fail before loading anything when int8 is asked for without torchao."""
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        raise MissingPackage("torchao", "train_model_precision 'int8'") from err
