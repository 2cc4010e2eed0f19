"""Forge Neo's loaded Z-Image / Anima trained in place: :class:`NeoDiTBundle`.

Facts from Neo's own files (fork nolanlane/sd-webui-forge-classic @ 6e1e0d5, the ``neo`` branch's layout):

* The engines (``backend/diffusion_engine/zimage.py`` ``ZImage``, ``anima.py`` ``Anima``) keep Forge's shape:
  ``forge_objects.unet`` is a ``UnetPatcher`` whose ``model`` (``KModel``) holds ``diffusion_model`` (Z-Image:
  ``backend.nn.lumina.NextDiT``; Anima: ``backend.nn.anima.Anima``, a Cosmos ``MiniTrainDIT``) and a
  ``PredictionDiscreteFlow`` predictor. Everything is built under ``torch.inference_mode()``.
* ``KModel.apply_model`` calls ``diffusion_model(x, predictor.timestep(σ), context=…)`` with ``timestep(σ) =
  σ · multiplier`` (1.0 for both) and reads the output as ε − x₀ (``prediction_type="const"``: denoised =
  x − σ · out). NextDiT returns the negated velocity of the original checkpoint itself, so no sign is ours.
  Anima's transformer works on (B, C, T, H, W) latents.
* ``get_learned_conditioning`` (inference mode) returns a *list*, one tensor per prompt: Z-Image the Qwen3
  penultimate hidden state of the chat-templated prompt, (L, D) with the prompt's own length L and no mask
  (Neo never pads a Z-Image prompt inside the model); Anima (1, 512, D): the LLM adapter's output (it lives
  on the text encoder, ``preprocess_text_embeds``) zero-padded to 512 tokens.
* ``encode_first_stage`` / ``decode_first_stage`` already apply the latent format (``process_in``: Flux's
  (z − 0.1159) · 0.3611 for Z-Image, Wan 2.1's per-channel mean/std for Anima), so latents come scaled;
  Anima's encoder takes one image at a time and returns (1, C, 1, h, w).
* The LoRA loader (``backend/patcher/lora.py`` → ``modules_forge/packages/comfy/lora.py``
  ``model_lora_keys_unet``) maps ``diffusion_model.<native path>`` and ``lora_unet_<native path>`` for every
  model, and for Z-Image also diffusers names (``…attention.to_q`` → a slice of the fused native
  ``attention.qkv``). Those are the keys :mod:`trainer.models.dit_keys` writes.

Adapters need the module names the standalone runtime uses (diffusers paths), so :func:`dit_view` lays
the host's own Linear modules out under diffusers paths (nothing copied). Z-Image's fused ``qkv`` has no
q/k/v modules: for the job it runs through three :class:`FusedSlice` views of its weight (as
:mod:`trainer.models.openclip` does for OpenCLIP's fused attention); :meth:`NeoDiTBundle.release` puts its
forward back. The core never imports Neo: the host hands the engine in.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import TrainTrainError
from trainer.models.bundle import Cond, Family, UNetShape
from trainer.models.inplace import OutOfPlaceAugmented
from trainer.modes.objective import FlowSchedule

# Neo's engine class -> family (class names of backend/diffusion_engine/{zimage,anima}.py)
NEO_DIT_ENGINES = {"ZImage": Family.ZIMAGE, "Anima": Family.ANIMA}
# Neo's names for flow families we do not train yet (refused with one line, not half-trained)
NEO_FLOW_ENGINES = ("Flux", "Flux2", "Chroma", "QwenImage", "Lumina2", "Wan")
BLOCK_CLASSES = ("JointTransformerBlock", "Block")  # NextDiT's and MiniTrainDIT's transformer blocks
TE_NOTE_NEO_DIT = "text-encoder training is not supported for Z-Image/Anima (Qwen3 stays frozen); the transformer is trained"
_SLICED = "__traintrain_sliced__"


def neo_dit_family(sd_model: Any) -> Family | None:
    """Z-Image or Anima when ``sd_model`` is Neo's engine for it; None for any other model.

    Raises:
        TrainTrainError: a flow family Neo loads that we do not train yet (one line, nothing touched).
    """
    name = type(sd_model).__name__
    if name in NEO_DIT_ENGINES and hasattr(sd_model, "forge_objects"):
        return NEO_DIT_ENGINES[name]
    if name in NEO_FLOW_ENGINES and hasattr(sd_model, "forge_objects"):
        raise TrainTrainError(f"model: the Web-UI has a {name} model loaded; training {name} comes in the next "
                              "release (Z-Image, Anima, SD1 and SDXL train today)")
    return None


class FusedSlice(nn.Linear):
    """Rows ``start:start + size`` of a fused Linear, as a Linear of its own (q, k or v of NextDiT's ``qkv``).
    It owns no parameters: weight and bias are views of the fused module's, which stay frozen."""

    def __init__(self, fused: nn.Linear, start: int, size: int) -> None:
        nn.Module.__init__(self)  # no parameters of our own
        self.__dict__["fused"] = fused  # a plain reference, not a submodule
        self.start, self.in_features, self.out_features = start, fused.in_features, size

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.fused.weight[self.start:self.start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = self.fused.bias
        return None if b is None else b[self.start:self.start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype or w.device != x.device:  # as Neo's manual-cast Linear casts its weight per call
            w, b = w.to(x.device, x.dtype), None if b is None else b.to(x.device, x.dtype)
        return F.linear(x, w, b)


def _slice_qkv(attention: nn.Module) -> tuple[FusedSlice, FusedSlice, FusedSlice]:
    """Route a NextDiT ``JointAttention.qkv`` through q/k/v views for the job (idempotent)."""
    qkv = attention.qkv
    done = getattr(qkv.__dict__.get("forward"), _SLICED, None)
    if done is not None:
        return done
    if "forward" in qkv.__dict__:
        raise TrainTrainError("model: Z-Image's attention.qkv already has an instance forward (another extension?); "
                              "cannot train it in place")
    hd = int(attention.head_dim)
    q_size, kv_size = int(attention.n_local_heads) * hd, int(attention.n_local_kv_heads) * hd
    views = (FusedSlice(qkv, 0, q_size), FusedSlice(qkv, q_size, kv_size), FusedSlice(qkv, q_size + kv_size, kv_size))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([v(x) for v in views], dim=-1)  # v(x): adapters patch the views' forwards

    setattr(forward, _SLICED, views)
    qkv.forward = forward
    return views


def _unslice_qkv(model: nn.Module) -> int:
    count = 0
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), _SLICED, None) is not None:
            del m.__dict__["forward"]
            count += 1
    return count


def _node(**children: nn.Module) -> nn.Module:
    node = nn.Module()
    for name, child in children.items():
        node.add_module(name, child)
    return node


def _zimage_view(model: nn.Module) -> nn.Module:
    """diffusers ``ZImageTransformer2DModel`` paths over NextDiT's modules."""
    root = nn.Module()
    for group in ("layers", "noise_refiner", "context_refiner"):
        blocks = []
        for block in getattr(model, group):
            q, k, v = _slice_qkv(block.attention)
            attention = _node(to_q=q, to_k=k, to_v=v, to_out=nn.ModuleList([block.attention.out]))
            ff = block.feed_forward
            blocks.append(_node(attention=attention, feed_forward=_node(w1=ff.w1, w2=ff.w2, w3=ff.w3)))
        root.add_module(group, nn.ModuleList(blocks))
    return root


def _anima_view(model: nn.Module) -> nn.Module:
    """diffusers ``CosmosTransformer3DModel`` paths over MiniTrainDIT's modules."""
    def attn(a: nn.Module) -> nn.Module:
        return _node(to_q=a.q_proj, to_k=a.k_proj, to_v=a.v_proj, to_out=nn.ModuleList([a.output_proj]))

    blocks = []
    for block in model.blocks:
        ff = _node(net=nn.ModuleList([_node(proj=block.mlp.layer1), nn.Identity(), block.mlp.layer2]))
        blocks.append(_node(attn1=attn(block.self_attn), attn2=attn(block.cross_attn), ff=ff))
    return _node(transformer_blocks=nn.ModuleList(blocks))


def dit_view(model: nn.Module, family: Family) -> nn.Module:
    """The host transformer's adaptable Linears under the diffusers paths ``dit_keys`` selects and names."""
    return _zimage_view(model) if family is Family.ZIMAGE else _anima_view(model)


class NeoDiTBundle:
    """A :class:`~trainer.models.bundle.ModelBundle` over Neo's loaded Z-Image or Anima engine, in place.

    ``unet`` is the diffusers-named view (what adapters attach to); ``transformer`` is the host's model,
    which ``predict`` calls exactly as Neo's ``KModel.apply_model`` does.

    Args:
        sd_model: Neo's ``ZImage`` or ``Anima`` engine.
        device: where training runs.
    """

    layout = "dit"
    v_pred = False
    unet_shape = UNetShape(0, ())
    vae_scale_factor = 8
    flow_sampling = "logit_normal"
    forge = True
    text_encoder_note = TE_NOTE_NEO_DIT

    def __init__(self, sd_model: Any, *, device: torch.device) -> None:
        family = neo_dit_family(sd_model)
        if family is None:
            raise TrainTrainError(f"model: {type(sd_model).__name__} is not Forge Neo's Z-Image or Anima engine")
        self.sd_model, self.family = sd_model, family
        kmodel = sd_model.forge_objects.unet.model
        self.transformer: nn.Module = kmodel.diffusion_model
        self.predictor = kmodel.predictor
        self.device = torch.device(device)
        self.dtype = next(self.transformer.parameters()).dtype  # storage
        # Neo computes in KModel.computation_dtype (its Linears cast their stored weights per call), e.g. bf16
        # storage with fp32 compute on CPU: training runs the same arithmetic as its inference
        self.compute_dtype = getattr(kmodel, "computation_dtype", None) or self.dtype
        away = sum(1 for p in self.transformer.parameters() if p.device != self.device)
        if away:
            # Neo loads a model partly when VRAM is short and streams the rest per layer: autograd and our
            # adapters need every weight on the training device
            raise TrainTrainError(f"model: Forge Neo keeps {away} of this model's weights off {self.device} (it did not "
                                  "fit the free VRAM whole); raise 'GPU Weights' in Neo's top bar or free VRAM, then "
                                  "start again")
        self.latent_channels = int(getattr(self.transformer, "in_channels", 16))
        self.flow = FlowSchedule(shift=self._family_shift())
        self.alphas_cumprod = torch.zeros(1000, device=self.device)  # unused: flow models have no ᾱ table
        self.text_encoders: dict[str, nn.Module] = {}
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.name = str(getattr(info, "model_name", None) or getattr(info, "title", None) or family.value)
        self.turbo = family is Family.ZIMAGE and "turbo" in self.name.lower()
        self.notes: list[str] = [TE_NOTE_NEO_DIT]
        if self.turbo:
            from trainer.models.dit_loading import TURBO_NOTE

            self.notes.append(TURBO_NOTE)
        self._checkpointed: list[nn.Module] = []
        self.unet = dit_view(self.transformer, family)

    def _family_shift(self) -> float:
        """The family's shift from Neo's model config (``sampling_settings``); Neo's Z-Image engine moves its
        predictor's shift with the UI's Shift slider, which must not leak into training."""
        settings = getattr(getattr(self.sd_model, "model_config", None), "sampling_settings", None) or {}
        return float(settings.get("shift", getattr(self.predictor, "shift", 1.0)))

    # -- text -----------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Neo's own conditioning (emphasis and templates as at inference). Z-Image prompts keep their own
        lengths (``Cond.mask``); Anima's are all 512 tokens."""
        rows = self.sd_model.get_learned_conditioning(list(prompts))
        with torch.inference_mode(False):
            rows = [r.clone() for r in rows]  # inference tensors cannot be saved for backward; clones can
        if self.family is Family.ANIMA:
            return Cond(torch.cat([r.reshape(-1, *r.shape[-2:]) for r in rows]).to(self.device))
        longest = max(r.shape[0] for r in rows)
        context = torch.stack([F.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows]).to(self.device)
        mask = torch.tensor([[i < r.shape[0] for i in range(longest)] for r in rows], device=self.device)
        return Cond(context, None, mask=mask)

    # -- images ---------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Neo's ``encode_first_stage`` (latent format applied), one image at a time (Anima's takes one),
        inside ``fork_rng`` so the Web-UI's global RNG is untouched."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else secrets.randbits(62)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        out = []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for row in pixels:
                z = self.sd_model.encode_first_stage(row[None].to(self.device))
                out.append(z.reshape(1, z.shape[1], *z.shape[-2:]))  # Anima: (1, C, 1, h, w)
        with torch.inference_mode(False):
            return torch.cat(out).clone().float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.to(self.device)
        if self.family is Family.ANIMA:
            x = x.unsqueeze(2)
        pixels = self.sd_model.decode_first_stage(x)
        pixels = pixels.reshape(-1, *pixels.shape[-3:])  # Anima: (B, T, 3, H, W)
        with torch.inference_mode(False):
            return pixels.clone().float().clamp(-1, 1)

    # -- denoiser -------------------------------------------------------------------------------------

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ε − x₀ (float32) at σ = ``timesteps`` (float) or ``timesteps``/1000 (integer), through the host's
        transformer as ``KModel.apply_model`` calls it."""
        sigma = timesteps.float() if timesteps.is_floating_point() else timesteps.float() / 1000
        sigma = sigma.to(self.device).expand(noisy.shape[0])
        t = self.predictor.timestep(sigma).float()
        x = noisy.to(self.device, self.compute_dtype)  # as apply_model: inputs in the compute dtype, no autocast
        context = cond.context.to(self.device, self.compute_dtype)
        guard = OutOfPlaceAugmented() if torch.is_grad_enabled() else nullcontext()
        with guard:
            if self.family is Family.ANIMA:
                return self.transformer(x.unsqueeze(2), t, context=context).float().squeeze(2)
            return self._zimage(x, t, context, cond.mask)

    def _zimage(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Neo runs each Z-Image prompt at its own length (no padding inside the model): samples are grouped
        by prompt length, each group at exactly its tokens."""
        if mask is None:
            return self.transformer(x, t, context=context).float()
        lengths = mask.sum(dim=1).tolist()
        out: list[torch.Tensor | None] = [None] * x.shape[0]
        for length in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == length]
            pred = self.transformer(x[idx], t[idx], context=context[idx, : int(length)]).float()
            for j, i in enumerate(idx):
                out[i] = pred[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def set_compile(self, enabled: bool) -> str | None:
        return "train_compile is not supported in the Web-UI; training uncompiled" if enabled else None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant checkpointing of the transformer blocks through instance forwards."""
        from trainer.models.webui_runtime import checkpoint_blocks

        self._checkpointed = checkpoint_blocks(self.transformer, BLOCK_CLASSES, self._checkpointed, enabled,
                                               inplace_guard=True)

    def offload(self, *parts: str) -> None:
        """Nothing: Neo's memory manager moves its text encoder and VAE itself."""
        for part in parts:
            if part not in ("vae", "text_encoders"):
                raise ValueError(f"unknown part {part!r}; use 'vae' or 'text_encoders'")

    def preview_renderer(self) -> None:
        """Previews run our flow Euler loop over :meth:`predict` (Neo's sampler would re-patch the model)."""
        return None

    def release(self) -> None:
        """Undo what the bundle changed: checkpointing wrappers and the sliced ``qkv`` forwards."""
        self.set_gradient_checkpointing(False)
        _unslice_qkv(self.transformer)
