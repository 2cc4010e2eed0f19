"""The Web-UI runtime: a :class:`ModelBundle` over the model the Web-UI already has loaded.

A1111 (ldm ``LatentDiffusion`` for SD1/SD2, sgm ``DiffusionEngine`` for SDXL) and Forge (its backend
``IntegratedUNet2DConditionModel``) are trained **in place**: nothing is reloaded or copied, prompts go
through the Web-UI's own ``get_learned_conditioning`` and images through its own VAE, so training sees
exactly what inference sees (``shared/reference/webui-inplace.md``).

Choices (also in ``docs/webui.md``):

* SDXL conditioning: ``get_learned_conditioning`` returns ``{"crossattn", "vector"}``; ``vector`` is
  ``pooled (1280) + original size + crop + target size`` (sgm's ``ConcatTimestepEmbedderND``, 256 per
  value). We keep the pooled part only and rebuild the size part in :meth:`WebUIBundle.predict` from each
  sample's original size and crop (``Cond.size``), else from the pixel size of the latent (crop 0, 0),
  never from the size the prompt happened to be encoded with.
* Text encoders: a transformers ``CLIPTextModel`` (SD1, SDXL's first encoder) is exposed as it is;
  an OpenCLIP encoder (SD2, SDXL's second) through :func:`trainer.models.openclip.hf_view`, which routes
  its fused q/k/v attention through separate views for the length of the job, so adapters attach and
  save under the kohya names (``lora_te_…`` / ``lora_te1_…``, ``lora_te2_…``). sgm runs embedders that
  are not ``is_trainable`` under ``no_grad``, so the flag is raised on SDXL's two text embedders while
  the job runs. :meth:`WebUIBundle.release` undoes both. Not trained: Forge (its conditioning runs in
  inference mode) and ``--medvram`` (the encoder is swapped out while the U-Net runs); ``text_encoders``
  is then empty and ``text_encoder_note`` says why; :func:`check_text_encoder_training` turns that into
  a SettingsError.
* ``predict`` goes through ``apply_model`` on A1111, so ``--medvram``'s forward hooks move the U-Net to
  the GPU as at inference; Forge calls its U-Net directly after loading it with Forge's memory manager.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import SettingsError, TrainTrainError
from trainer.models import openclip
from trainer.models.bundle import Cond, Family, UNetShape
from trainer.models.components import rescale_zero_terminal_snr
from trainer.models.inplace import OutOfPlaceAugmented
from trainer.network.adapter import is_linear

TE_NOTE_FORGE = "text-encoder training is not supported on Forge (its conditioning runs in inference mode); the U-Net is trained"
TE_NOTE_MEDVRAM = "text-encoder training is off under --medvram (the text encoder is swapped out while the U-Net runs)"
BASE_KEY = "network_blocks(BASE = TextEncoder)"

# sgm's SDXL conditioner: each of original_size, crop_top_left, target_size is a pair of values, each
# embedded with a 256-wide sinusoid (ConcatTimestepEmbedderND(outdim=256)).
SDXL_SIZE_EMBED_DIM = 256
SDXL_SIZE_VALUES = 6

CHECKPOINTED_CLASSES = ("SpatialTransformer", "ResBlock")
_MISSING = object()


def sinusoid(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The ldm/sgm timestep embedding: ``[cos(v * f_i), sin(v * f_i)]`` with ``f_i = max_period^(-i/half)``.

    Args:
        values: (N,) values (timesteps or pixel sizes).
        dim: output width (even).
        max_period: lowest frequency's period.

    Returns:
        (N, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_size_embedding(batch: int, height: int, width: int, dim: int, device: torch.device,
                        size: torch.Tensor | None = None) -> torch.Tensor:
    """sgm's size conditioning: ``size`` (batch, 6) per sample (original h, w; crop top, left; target h, w),
    or, when None, ``original = target = (height, width)`` and crop ``(0, 0)``.

    Returns:
        (batch, 6 * dim): the part of the ``y`` vector that follows the pooled text embedding.
    """
    if size is None:
        values = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
        return sinusoid(values, dim).reshape(1, -1).expand(batch, -1)
    return sinusoid(size.to(device, torch.float32).reshape(-1), dim).reshape(batch, -1)


def unet_shape_of(unet: nn.Module) -> UNetShape:
    """Read the layout facts from an ldm-style U-Net (``input_blocks``/``output_blocks``).

    Raises:
        TrainTrainError: the module is not an ldm-style U-Net.
    """
    if not hasattr(unet, "input_blocks") or not hasattr(unet, "output_blocks"):
        raise TrainTrainError(f"the Web-UI's U-Net ({type(unet).__name__}) has no input_blocks/output_blocks; only ldm/sgm-style U-Nets can be trained in place")

    def kinds(block: nn.Module) -> set[str]:
        return {type(m).__name__ for m in block.children()}

    blocks = list(unet.input_blocks)
    first_down = next((i for i, b in enumerate(blocks) if "Downsample" in kinds(b)), len(blocks))
    per_level = first_down - 1
    outs = list(unet.output_blocks)
    step = per_level + 1
    up_attn = tuple(
        any("SpatialTransformer" in kinds(b) for b in outs[i : i + step]) for i in range(0, len(outs), step)
    )
    return UNetShape(layers_per_block=per_level, up_has_attention=up_attn)


def detect_family(sd_model: Any, context_dim: int | None = None) -> Family:
    """SDXL / SD2 / SD1 from the Web-UI model's flags (A1111 ``is_sdxl``/``is_sd2``, Forge class names)."""
    name = type(sd_model).__name__
    if getattr(sd_model, "is_sdxl", False) or name == "StableDiffusionXL":
        return Family.SDXL
    if getattr(sd_model, "is_sd2", False) or name == "StableDiffusion2":
        return Family.SD2
    if getattr(sd_model, "is_sd1", False) or name == "StableDiffusion":
        return Family.SD1
    if hasattr(sd_model, "conditioner"):
        return Family.SDXL
    return Family.SD2 if context_dim == 1024 else Family.SD1


def check_text_encoder_training(bundle: Any, blocks: Sequence[str]) -> None:
    """Refuse ``BASE`` (text encoder) training where the bundle exposes no text encoders.

    Raises:
        SettingsError: ``BASE`` is selected and the runtime cannot train the text encoder.
    """
    if "BASE" in blocks and not bundle.text_encoders:
        note = getattr(bundle, "text_encoder_note", None) or "this model's text encoder cannot be trained here"
        raise SettingsError(BASE_KEY, f"{note}; untick BASE")


def _first_param(module: nn.Module | None) -> torch.nn.Parameter | None:
    if module is None:
        return None
    return next(module.parameters(), None)


def own_inference_weights(root: nn.Module) -> int:
    """Replace parameters and buffers that are inference tensors with normal copies; returns how many.

    Forge and Forge Neo build their model inside ``torch.inference_mode()``: every weight is then an
    inference tensor, which autograd cannot save for backward, and ``p.data = p.data.clone()`` does not
    help ("Inference tensors do not track version counter"). New Parameter objects cloned outside
    inference mode do, and the host generates with them as before. Shared weights stay shared. The host
    keeps the copies after the job (putting the originals back would hold the model twice in memory).
    """
    done: dict[int, torch.Tensor] = {}
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in root.modules():
            for table, make in ((module._parameters, _param_copy), (module._buffers, _buffer_copy)):
                for name, t in list(table.items()):
                    if t is None or not t.is_inference():
                        continue
                    if id(t) not in done:
                        done[id(t)] = make(t)
                        count += 1
                    table[name] = done[id(t)]
    return count


def _param_copy(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.clone(), requires_grad=p.requires_grad)


def _buffer_copy(b: torch.Tensor) -> torch.Tensor:
    return b.clone()


def checkpoint_blocks(root: nn.Module, classes, checkpointed: list[nn.Module], enabled: bool, *,
                      inplace_guard: bool) -> list[nn.Module]:
    """Put checkpointed instance forwards (:func:`_checkpoint_forward`) on ``root``'s modules whose class name
    is in ``classes`` (``enabled``), or take the ones in ``checkpointed`` off; returns the modules carrying one."""
    if enabled and not checkpointed:
        for m in root.modules():
            if type(m).__name__ in classes and "forward" not in m.__dict__:
                m.forward = _checkpoint_forward(m, inplace_guard=inplace_guard)
                checkpointed.append(m)
    elif not enabled:
        for m in checkpointed:
            if getattr(m.__dict__.get("forward"), "__traintrain_checkpoint__", False):
                del m.__dict__["forward"]
        return []
    return checkpointed


def _checkpoint_forward(module: nn.Module, inplace_guard: bool = False):
    """An instance forward running ``type(module).forward`` (looked up per call, so class-level hijacks
    underneath keep working) under non-reentrant checkpointing while grad is enabled.

    ``inplace_guard`` re-enters :class:`~trainer.models.inplace.OutOfPlaceAugmented` inside the
    checkpointed function: its recomputation runs during backward, outside the caller's guard, and
    non-reentrant checkpointing raises the same "modified by an inplace operation" error without it.
    """
    from torch.utils.checkpoint import checkpoint

    def run(*args: Any, **kwargs: Any) -> Any:
        with OutOfPlaceAugmented() if inplace_guard else nullcontext():
            return type(module).forward(module, *args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    forward.__traintrain_checkpoint__ = True  # type: ignore[attr-defined]
    return forward


class _Conditioning(list):
    """Stand-in for A1111's ``prompt_parser.SdConditioning`` (a list of prompts with a size)."""

    def __init__(self, prompts: Sequence[str], width: int, height: int) -> None:
        super().__init__(prompts)
        self.width = width
        self.height = height
        self.is_negative_prompt = False


def _sd_conditioning(prompts: Sequence[str], width: int = 1024, height: int = 1024) -> list:
    try:
        from modules.prompt_parser import SdConditioning
    except ImportError:
        return _Conditioning(prompts, width, height)
    return SdConditioning(list(prompts), width=width, height=height)


class WebUIBundle:
    """A :class:`~trainer.models.bundle.ModelBundle` over ``shared.sd_model`` (A1111 or Forge), in place.

    Args:
        sd_model: the Web-UI's loaded model.
        device: where training runs (``modules.devices.device``).
        v_pred: the user's choice; None reads the model's parameterization.
        medvram: the Web-UI runs with ``--medvram`` (text encoder is not trained).
        renderer: the host's preview renderer, built from this bundle (A1111's txt2img path); None
            renders previews with our own sampler.
        zero_snr_option: the Web-UI's "Noise schedule for sampling" is "Zero Terminal SNR". A1111 1.10
            rescales ᾱ only from that option; later A1111 and Forge also set ``sd_model.ztsnr`` from a
            ``ztsnr`` key in the checkpoint. Either makes training use the rescaled schedule too.
    """

    layout = "ldm"
    vae_scale_factor = 8

    def __init__(self, sd_model: Any, *, device: torch.device, v_pred: bool | None = None, medvram: bool = False,
                 zero_snr_option: bool = False, renderer: Callable[[WebUIBundle], Any] | None = None) -> None:
        self.sd_model = sd_model
        self._renderer = renderer
        self.forge = hasattr(sd_model, "forge_objects")
        if self.forge:
            self.unet = sd_model.forge_objects.unet.model.diffusion_model
        else:
            self.unet = sd_model.model.diffusion_model
        self.unet_shape = unet_shape_of(self.unet)
        self.family = detect_family(sd_model, getattr(self.unet, "context_dim", None))
        self.device = torch.device(device)
        self.dtype = next(self.unet.parameters()).dtype
        self.detected_v_pred = self._detect_v_pred()
        self.v_pred = self.detected_v_pred if v_pred is None else bool(v_pred)
        self.notes: list[str] = []
        self.zero_snr = bool(getattr(sd_model, "ztsnr", False)) or zero_snr_option
        self.alphas_cumprod = self._alphas_cumprod()
        if self.zero_snr:
            why = "the model's ztsnr flag" if getattr(sd_model, "ztsnr", False) else "the Web-UI's noise schedule option"
            self.notes.append(f"zero-terminal SNR (from {why}): training on the rescaled schedule")
        self.name = self._name()
        self.scale_factor = float(getattr(sd_model, "scale_factor", 0.13025 if self.family is Family.SDXL else 0.18215))
        self._views: list[openclip.HFView] = []
        self._flags: list[tuple[Any, str, Any]] = []
        self._view_error: str | None = None
        self._checkpointed: list[nn.Module] = []
        self._offloaded: list[nn.Module] = []  # what offload() moved to the CPU (previews bring it back)
        if self.v_pred != self.detected_v_pred:
            self.notes.append(f"model_v_pred={self.v_pred} overrides the model's own prediction type ({'v' if self.detected_v_pred else 'eps'})")
        self.text_encoders, self.text_encoder_note = self._text_encoders(medvram)
        if self.text_encoder_note:
            self.notes.append(self.text_encoder_note)
        self.pooled_dim, self.size_dim = self._sdxl_dims()

    # -- discovery -------------------------------------------------------------------------------

    def _detect_v_pred(self) -> bool:
        m = self.sd_model
        if getattr(m, "parameterization", None) == "v":
            return True
        predictor = getattr(getattr(getattr(m, "forge_objects", None), "unet", None), "model", None)
        predictor = getattr(predictor, "predictor", None)
        if predictor is not None:
            kind = getattr(predictor, "prediction_type", "") or type(predictor).__name__
            return kind in ("v", "v_prediction", "PredictionV")
        return False

    def _alphas_cumprod(self) -> torch.Tensor:
        m = self.sd_model
        # A1111 may swap alphas_cumprod per generation (fp16 downcast, zero-terminal SNR); the original stays.
        ac = getattr(m, "alphas_cumprod_original", None)
        if ac is None:
            ac = getattr(m, "alphas_cumprod", None)
        if ac is None and self.forge:
            predictor = getattr(m.forge_objects.unet.model, "predictor", None)
            ac = getattr(predictor, "alphas_cumprod", None)
            sigmas = getattr(predictor, "sigmas", None)
            if ac is None and sigmas is not None:
                ac = 1.0 / (1.0 + sigmas.float() ** 2)
        if ac is None:
            raise TrainTrainError("the Web-UI model has no alphas_cumprod noise schedule; cannot train it in place")
        ac = torch.as_tensor(ac).detach().to(self.device, torch.float32).clone()
        if ac.shape != (1000,):
            raise TrainTrainError(f"the Web-UI model's noise schedule has {tuple(ac.shape)} entries; 1000 expected")
        if self.zero_snr and float(ac[-1]) > 1e-8:  # not yet rescaled (alphas_cumprod_original never is)
            ac = rescale_zero_terminal_snr(ac.cpu()).to(self.device)
        return ac

    def _name(self) -> str:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        filename = getattr(info, "filename", None)
        if filename:
            return Path(filename).stem
        return str(getattr(info, "name", None) or getattr(self.sd_model, "sd_model_checkpoint", None) or "webui-model")

    def _text_encoders(self, medvram: bool) -> tuple[dict[str, nn.Module], str | None]:
        if self.forge:
            return {}, TE_NOTE_FORGE
        if medvram:
            return {}, TE_NOTE_MEDVRAM
        if self.family is Family.SDXL:
            found: dict[str, nn.Module] = {}
            for embedder in getattr(getattr(self.sd_model, "conditioner", None), "embedders", []) or []:
                # sgm runs non-trainable embedders under no_grad; A1111's wrappers copy the flag
                view = self._encoder_view(getattr(embedder, "wrapped", None), all_layers=True)
                if view is None:
                    continue
                prefix = "lora_te2" if isinstance(view, openclip.HFView) else "lora_te1"
                if prefix not in found:
                    found[prefix] = view
                    self._flags.append((embedder, "is_trainable", embedder.__dict__.get("is_trainable", _MISSING)))
                    embedder.is_trainable = True
            if set(found) == {"lora_te1", "lora_te2"}:
                return found, None
            self.release()
            return {}, self._view_error or "this SDXL model's text encoders are not CLIP-L + OpenCLIP as expected; the U-Net is trained"
        view = self._encoder_view(getattr(getattr(self.sd_model, "cond_stage_model", None), "wrapped", None), all_layers=False)
        if view is None:
            if self._view_error:
                return {}, self._view_error
            return {}, f"this {self.family.value.upper()} model's text encoder is neither a transformers CLIPTextModel nor OpenCLIP; the U-Net is trained"
        return {"lora_te": view}, None

    def _encoder_view(self, wrapped: Any, *, all_layers: bool) -> nn.Module | None:
        """The encoder under an ldm/sgm embedder as an HF-named tree: a transformers CLIPTextModel as
        it is, an OpenCLIP transformer through :func:`~trainer.models.openclip.hf_view`."""
        transformer = getattr(getattr(wrapped, "model", None), "transformer", None)
        blocks = openclip.resblocks_of(transformer)
        if blocks:
            # ldm's SD2 embedder stops layer_idx blocks early: adapters there would never train. sgm's
            # SDXL embedder runs them all (its pooled output comes from the last block).
            layers = len(blocks) if all_layers else len(blocks) - int(getattr(wrapped, "layer_idx", 0) or 0)
            try:
                view = openclip.hf_view(transformer, layers)
            except ValueError as err:  # e.g. another extension already wraps the attention's forward
                self._view_error = f"the OpenCLIP text encoder cannot be trained here ({err}); the U-Net is trained"
                return None
            self._views.append(view)
            return view
        te = getattr(wrapped, "transformer", None)
        if isinstance(te, nn.Module) and (hasattr(te, "text_model") or hasattr(te, "encoder")):
            return te
        return None

    def release(self) -> None:
        """Undo what the bundle changed for training: checkpointing wrappers, unfused OpenCLIP
        attention, embedder flags. The host calls it when the job ends (its snapshot checks the rest)."""
        self.set_gradient_checkpointing(False)
        for view in self._views:
            openclip.release_view(view)
        self._views.clear()
        for owner, name, value in reversed(self._flags):
            if value is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, value)
        self._flags.clear()

    def _sdxl_dims(self) -> tuple[int, int]:
        if self.family is not Family.SDXL:
            return 0, 0
        label = getattr(self.unet, "label_emb", None)
        first = next((m for m in label.modules() if is_linear(m)), None) if label is not None else None
        if first is None:
            raise TrainTrainError("this SDXL U-Net has no label_emb; cannot build its size conditioning")
        size_dim = SDXL_SIZE_EMBED_DIM
        conditioner = getattr(self.sd_model, "conditioner", None)
        for emb in getattr(conditioner, "embedders", []) or []:
            if type(emb).__name__ == "ConcatTimestepEmbedderND":
                size_dim = int(getattr(emb, "outdim", size_dim))
        forge_embedder = getattr(self.sd_model, "embedder", None)  # Forge/Neo's SDXL engine: Timestep(256)
        if self.forge and isinstance(getattr(forge_embedder, "dim", None), int):
            size_dim = forge_embedder.dim
        pooled = first.in_features - SDXL_SIZE_VALUES * size_dim
        if pooled <= 0:
            raise TrainTrainError(f"SDXL label_emb takes {first.in_features} values, fewer than the size conditioning needs")
        return pooled, size_dim

    # -- ModelBundle -----------------------------------------------------------------------------

    def _no_inference(self):
        return torch.inference_mode(False) if hasattr(torch, "inference_mode") else nullcontext()

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Encode through the Web-UI's ``get_learned_conditioning`` (emphasis, embeddings, CLIP skip,
        75-token chunks all as at inference)."""
        prompts = list(prompts)
        if self.family is Family.SDXL:
            c = self.sd_model.get_learned_conditioning(_sd_conditioning(prompts))
            context, vector = c["crossattn"], c["vector"]
            context = self._own(context)
            pooled = self._own(vector)[:, : self.pooled_dim]
            return Cond(context.to(self.device), pooled.to(self.device))
        c = self.sd_model.get_learned_conditioning(prompts)
        if isinstance(c, dict):  # Forge SD1/SD2 may hand back the dict form
            c = c["crossattn"]
        return Cond(self._own(c).to(self.device))

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        # Forge decorates its conditioning/VAE with inference_mode; such tensors cannot be saved for
        # backward, a clone made outside inference mode can.
        if self.forge or (hasattr(t, "is_inference") and t.is_inference()):
            with self._no_inference():
                return t.clone()
        return t

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode through the Web-UI's VAE; the latent sample is drawn inside ``fork_rng`` seeded from
        ``generator``, so the Web-UI's global RNG is untouched."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else secrets.randbits(62)
        vae = getattr(self.sd_model, "first_stage_model", None)
        p = _first_param(vae)
        dtype = p.dtype if p is not None else self.dtype
        fork_devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(seed)
            z = self.sd_model.encode_first_stage(pixels.to(self.device, dtype))
            get = getattr(self.sd_model, "get_first_stage_encoding", None)
            if get is not None:
                z = get(z)
            elif hasattr(z, "sample"):
                z = z.sample() * self.scale_factor
        return self._own(z).float()

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Run the U-Net; SDXL's ``y`` = pooled + size embedding of ``cond.size`` (else the latent's pixel size)."""
        x = noisy.to(self.device, self.dtype)
        t = timesteps.to(self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        context = cond.context.to(self.device, self.dtype)
        y = None
        if self.family is Family.SDXL:
            if cond.pooled is None:
                raise TrainTrainError("SDXL conditioning needs the pooled text embedding (Cond.pooled is None)")
            h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
            size = sdxl_size_embedding(x.shape[0], h, w, self.size_dim, self.device, cond.size)
            y = torch.cat([cond.pooled.to(self.device, torch.float32), size], dim=1).to(self.dtype)
        # half weights run under autocast, as the Web-UI runs them at inference
        half = (self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)) or (
            self.device.type == "cpu" and self.dtype == torch.bfloat16
        )
        amp = torch.autocast(self.device.type, dtype=self.dtype) if half else nullcontext()
        # Forge's U-Net adds residuals in place (x += n), which autograd cannot differentiate through
        guard = OutOfPlaceAugmented() if self.forge and torch.is_grad_enabled() else nullcontext()
        with amp, guard:
            if self.forge:
                out = self.unet(x, timesteps=t, context=context, y=y)
            elif y is not None:
                out = self.sd_model.apply_model(x, t, {"crossattn": context, "vector": y})
            else:
                out = self.sd_model.apply_model(x, t, context)
        return out.float()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant checkpointing through instance forwards on SpatialTransformer/ResBlock (never
        A1111's reentrant ``sd_hijack_checkpoint``, never ldm's own flags: both drop adapter grads)."""
        self._checkpointed = checkpoint_blocks(self.unet, CHECKPOINTED_CLASSES, self._checkpointed, enabled,
                                               inplace_guard=self.forge)

    def offload(self, *parts: str) -> None:
        """Move the VAE / text encoders to the CPU (A1111; Forge manages memory itself). The host puts
        them back when the job ends."""
        if self.forge:
            return
        for part in parts:
            if part == "vae":
                module = getattr(self.sd_model, "first_stage_model", None)
            elif part == "text_encoders":
                module = getattr(self.sd_model, "conditioner", None) or getattr(self.sd_model, "cond_stage_model", None)
            else:
                raise ValueError(f"unknown part {part!r}; use 'vae' or 'text_encoders'")
            if module is not None:
                module.to("cpu")
                if module not in self._offloaded:
                    self._offloaded.append(module)

    @contextmanager
    def onloaded(self) -> Iterator[None]:
        """Bring parts that :meth:`offload` moved to the CPU back to the device for a preview, and send
        them back afterwards (the Web-UI's sampler expects its VAE and text encoder on its device)."""
        homes = [(m, _first_param(m).device) for m in self._offloaded if _first_param(m) is not None]
        try:
            for module, _ in homes:
                module.to(self.device)
            yield
        finally:
            for module, home in homes:
                module.to(home)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode through the Web-UI's ``decode_first_stage`` (previews): pixels in [-1, 1], float32."""
        vae = getattr(self.sd_model, "first_stage_model", None)
        p = _first_param(vae)
        dtype = p.dtype if p is not None else self.dtype
        with self.onloaded():
            pixels = self.sd_model.decode_first_stage(latents.to(self.device, dtype))
        return self._own(pixels).float().clamp(-1, 1)

    def preview_renderer(self):
        """The host's preview renderer (A1111: its own txt2img path, handed in by the host as
        ``renderer``), or None: previews then run our loop on this bundle (Forge, whose sampler
        re-patches the U-Net through its model patcher, which in-place training bypasses)."""
        if self.forge or self._renderer is None:
            return None
        return self._renderer(self)
