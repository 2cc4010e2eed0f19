"""Tiny seeded SD1-, SD2- and SDXL-like models in both layouts, wrapped in minimal bundles."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from trainer.models import names
from trainer.models.bundle import Family, UNetShape

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@dataclass
class FakeBundle:
    """The ModelBundle attributes the network package reads."""

    family: Family
    layout: str
    unet_shape: UNetShape
    unet: nn.Module
    text_encoders: dict[str, nn.Module]
    v_pred: bool = False
    name: str = "tiny"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


def tiny_unet(sdxl: bool = False, *, sd2: bool = False, layers: int = 1) -> nn.Module:
    """A seeded tiny U-Net with two levels.

    SD1: 1×1-conv proj_in/out, cross-attention at the first level. SD2: the same layout with Linear
    proj_in/out, its own cross-attention width (48) and per-level head counts. SDXL: attention at the
    second level with 1 and 2 transformer layers, Linear projections, text-time embedding.
    ``layers`` is ``layers_per_block`` (2 = the real models' 3 ldm blocks per level).
    """
    torch.manual_seed(0)
    if sdxl:
        return diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=80, attention_head_dim=(2, 4), norm_num_groups=32, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8,
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
        ).eval()
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48 if sd2 else 32, attention_head_dim=(4, 8) if sd2 else (2, 4), norm_num_groups=32,
        use_linear_projection=sd2,
    ).eval()


def tiny_clip(hidden: int = 32, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77,
    )
    return transformers.CLIPTextModel(config).eval()


SD1_SHAPE = UNetShape(layers_per_block=1, up_has_attention=(False, True))
SDXL_SHAPE = UNetShape(layers_per_block=1, up_has_attention=(True, False))
SD2_SHAPE = SD1_SHAPE  # same block layout; SD2 differs inside the attention blocks


# -- an ldm/sgm-named view over a diffusers U-Net (same leaf modules, ldm paths and class names) ----------
class SpatialTransformer(nn.Module):
    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.norm, self.proj_in, self.proj_out = src.norm, src.proj_in, src.proj_out
        self.transformer_blocks = src.transformer_blocks


class ResBlock(nn.Module):
    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(src.norm1, nn.SiLU(), src.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), src.time_emb_proj)
        self.out_layers = nn.Sequential(src.norm2, nn.SiLU(), nn.Dropout(0.0), src.conv2)
        self.skip_connection = src.conv_shortcut if src.conv_shortcut is not None else nn.Identity()


class Downsample(nn.Module):
    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.op = src.conv


class Upsample(nn.Module):
    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.conv = src.conv


_VIEW = {"Transformer2DModel": SpatialTransformer, "ResnetBlock2D": ResBlock, "Downsample2D": Downsample, "Upsample2D": Upsample}


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


def ldm_view(unet: nn.Module, shape: UNetShape) -> nn.Module:
    """A module tree named like ldm's UNetModel whose leaves are ``unet``'s own modules."""
    root = nn.Module()
    for path, module in unet.named_modules():
        cls = _VIEW.get(type(module).__name__)
        if cls is not None:
            _place(root, names.diffusers_to_ldm(path, shape), cls(module))
    for top in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        _place(root, names.diffusers_to_ldm(top, shape), unet.get_submodule(top))
    return root


@pytest.fixture(scope="session")
def sd1_parts():
    return tiny_unet(), tiny_clip()


@pytest.fixture(scope="session")
def sdxl_parts():
    return tiny_unet(sdxl=True), tiny_clip(32, 1), tiny_clip(48, 2)


@pytest.fixture
def sd1_bundle(sd1_parts):
    unet, te = sd1_parts
    return FakeBundle(Family.SD1, "diffusers", SD1_SHAPE, unet, {"lora_te": te})


@pytest.fixture(scope="session")
def sd2_parts():
    return tiny_unet(sd2=True), tiny_clip(48, 3)


@pytest.fixture
def sd2_bundle(sd2_parts):
    unet, te = sd2_parts
    return FakeBundle(Family.SD2, "diffusers", SD2_SHAPE, unet, {"lora_te": te})


@pytest.fixture
def sd2_ldm_bundle(sd2_parts):
    unet, te = sd2_parts
    return FakeBundle(Family.SD2, "ldm", SD2_SHAPE, ldm_view(unet, SD2_SHAPE), {"lora_te": te})


@pytest.fixture
def sdxl_bundle(sdxl_parts):
    unet, te1, te2 = sdxl_parts
    return FakeBundle(Family.SDXL, "diffusers", SDXL_SHAPE, unet, {"lora_te1": te1, "lora_te2": te2})


@pytest.fixture
def sd1_ldm_bundle(sd1_parts):
    unet, te = sd1_parts
    return FakeBundle(Family.SD1, "ldm", SD1_SHAPE, ldm_view(unet, SD1_SHAPE), {"lora_te": te})


@pytest.fixture
def sdxl_ldm_bundle(sdxl_parts):
    unet, te1, te2 = sdxl_parts
    return FakeBundle(Family.SDXL, "ldm", SDXL_SHAPE, ldm_view(unet, SDXL_SHAPE), {"lora_te1": te1, "lora_te2": te2})


def _unet_inputs(bundle: FakeBundle, seed: int = 0) -> tuple[tuple, dict]:
    """Seeded (args, kwargs) for the tiny diffusers U-Net of ``bundle``."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    t = torch.tensor([10])
    if bundle.family is Family.SDXL:
        ctx = torch.randn(1, 7, 80, generator=gen)
        added = {"text_embeds": torch.randn(1, 48, generator=gen), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
        return (sample, t, ctx), {"added_cond_kwargs": added}
    width = 48 if bundle.family is Family.SD2 else 32
    return (sample, t, torch.randn(1, 7, width, generator=gen)), {}


@pytest.fixture(scope="session")
def unet_inputs():
    """``unet_inputs(bundle, seed=0) -> (args, kwargs)`` for the bundle's tiny diffusers U-Net."""
    return _unet_inputs
