"""Tiny Forge / Forge Neo engines that behave like the real ones where it matters for training.

Measured in real builds (``shared/reference/realhosts.md``) and imitated here:

* the whole engine is built inside ``torch.inference_mode()`` (``forge_model_reload``), so every weight
  is an inference tensor with ``requires_grad=True``; the U-Net's are set to False by ``KModel``;
* the U-Net adds its residuals in place: ``x += n`` after ``attn1`` and ``attn2``, ``x += x_skip`` after
  the feed-forward (``backend/nn/unet.py``), which autograd cannot differentiate through;
* conditioning and the VAE run under ``@torch.inference_mode()``;
* ``shared.sd_model`` is Neo's ``backend.diffusion_engine.sd15.StableDiffusion`` (not an ``nn.Module``):
  the U-Net is ``forge_objects.unet.model.diffusion_model``, the predictor holds the noise schedule.

The U-Net's leaves are a tiny diffusers U-Net's modules (``fake_models``), so its output equals the
diffusers U-Net's; only the residual adds are Forge's.
"""

from __future__ import annotations

import fake_models
import torch
from torch import nn

FORGE_UNET = "backend.nn.unet"


class SpatialTransformer(fake_models.SpatialTransformer):
    """Forge's ``SpatialTransformer`` + ``BasicTransformerBlock`` forward, residuals added in place."""

    def forward(self, x, context=None, transformer_options=None):
        t = self.impl
        linear = bool(t.use_linear_projection)
        b, _, h, w = x.shape
        x_in = x
        x = t.norm(x)
        if not linear:
            x = t.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
        if linear:
            x = t.proj_in(x)
        for block in t.transformer_blocks:
            n = block.attn1(block.norm1(x))
            x += n  # backend/nn/unet.py: in place
            n = block.attn2(block.norm2(x), encoder_hidden_states=context)
            x += n
            x_skip = x
            x = block.ff(block.norm3(x))
            x += x_skip
        if linear:
            x = t.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if not linear:
            x = t.proj_out(x)
        return x + x_in


class ForgeLinear(nn.Module):
    """``backend.operations.ForgeOperations.Linear``, the class of every Linear in a model Forge or Neo loads
    (``using_forge_operations`` swaps it in for ``torch.nn.Linear`` while the loader builds the model): a
    plain ``nn.Module`` with ``in_features``/``out_features``, ``weight``/``bias`` and ``F.linear`` in
    ``forward`` — *not* an ``nn.Linear`` (measured: adapters went only on convolutions while we tested for it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.parameters_manual_cast = False

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.parameters_manual_cast:  # storage dtype != compute dtype: cast per call, as Forge's ops do
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


class IntegratedUNet2DConditionModel(fake_models.UNetModel):
    """Forge's U-Net class: ldm names, Forge's forward signature, in-place transformer blocks, Forge's Linear."""

    def __init__(self, unet) -> None:
        super().__init__(unet)
        for module in self.modules():
            if type(module) is fake_models.SpatialTransformer:
                module.__class__ = SpatialTransformer
            elif type(module) is nn.Linear:
                module.__class__ = ForgeLinear  # same attributes, Forge's class
                module.parameters_manual_cast = False

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        return super().forward(x, timesteps=timesteps, context=context, y=y)


SpatialTransformer.__module__ = IntegratedUNet2DConditionModel.__module__ = FORGE_UNET


class Predictor(nn.Module):
    """``backend.modules.k_prediction.Prediction``: the schedule as buffers (inference tensors too)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


class KModel(nn.Module):
    def __init__(self, diffusion_model: nn.Module, predictor: Predictor, storage_dtype=torch.float32) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.diffusion_model.eval()
        self.diffusion_model.requires_grad_(False)  # backend/modules/k_model.py:30
        self.predictor = predictor
        self.storage_dtype = self.computation_dtype = storage_dtype


class UnetPatcher:
    def __init__(self, model: KModel) -> None:
        self.model = model


class _Clip:
    def __init__(self, cond_stage_model: nn.Module) -> None:
        self.cond_stage_model = cond_stage_model


class _Vae:
    def __init__(self, first_stage_model: nn.Module) -> None:
        self.first_stage_model = first_stage_model


class ForgeObjects:
    def __init__(self, unet, clip, vae) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, None

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae)


class ForgeDiffusionEngine:
    """Forge/Neo's engine base (``backend/diffusion_engine/base.py``): not an ``nn.Module``; its parts in
    ``forge_objects`` (with the two copies Forge keeps) and the legacy names A1111 code reads."""

    is_sd1 = is_sdxl = False

    def hold(self, objects: ForgeObjects) -> None:
        self.forge_objects = objects
        self.forge_objects_original = objects.shallow_copy()
        self.forge_objects_after_applying_lora = objects.shallow_copy()

    @property
    def first_stage_model(self):
        return self.forge_objects.vae.first_stage_model

    @property
    def cond_stage_model(self):
        return self.forge_objects.clip.cond_stage_model


class _Engine(ForgeDiffusionEngine):
    """Forge's SD engines over the fake ldm model."""

    def __init__(self, ldm, storage_dtype=torch.float32) -> None:
        self._ldm = ldm
        unet = IntegratedUNet2DConditionModel(ldm.model.diffusion_model.diffusers_unet)
        predictor = Predictor(ldm.alphas_cumprod, getattr(ldm, "parameterization", "eps"))
        self.hold(ForgeObjects(UnetPatcher(KModel(unet, predictor, storage_dtype)), _Clip(self._text(ldm)),
                               _Vae(ldm.first_stage_model)))

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        return self._ldm.get_learned_conditioning(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        z = self._ldm.encode_first_stage(x)
        return self._ldm.get_first_stage_encoding(z) if hasattr(z, "sample") else z

    def get_first_stage_encoding(self, x):
        return x

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self._ldm.decode_first_stage(z)

    @torch.inference_mode()
    def generate(self, x: torch.Tensor, t: torch.Tensor, prompts) -> torch.Tensor:
        """One U-Net prediction as a generation computes it (inference mode, in-place adds)."""
        cond = self.get_learned_conditioning(prompts)
        unet = self.forge_objects.unet.model.diffusion_model
        if isinstance(cond, dict):
            return unet(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])
        return unet(x, timesteps=t, context=cond)


class StableDiffusion(_Engine):
    is_sd1 = True

    @staticmethod
    def _text(ldm):
        return ldm.cond_stage_model


class Timestep(nn.Module):
    """``backend.nn.unet.Timestep``: the sinusoid SDXL's size conditioning uses (256 wide in Forge)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim


class StableDiffusionXL(_Engine):
    is_sdxl = True

    def __init__(self, ldm, storage_dtype=torch.float32) -> None:
        super().__init__(ldm, storage_dtype)
        self.embedder = Timestep(ldm.conditioner.embedders[-1].outdim)

    @staticmethod
    def _text(ldm):
        return ldm.conditioner


StableDiffusion.__module__ = "backend.diffusion_engine.sd15"
StableDiffusionXL.__module__ = "backend.diffusion_engine.sdxl"


def forge_sd1(seed: int = 1) -> StableDiffusion:
    """Built as ``forge_model_reload`` builds it (call it under inference mode to match Forge)."""
    return StableDiffusion(fake_models.LatentDiffusion(seed=seed))


def forge_sdxl(seed: int = 2) -> StableDiffusionXL:
    return StableDiffusionXL(fake_models.DiffusionEngine(seed=seed))
