"""Tiny ldm/sgm-shaped Web-UI models that really compute.

The U-Net is an ldm-named tree (``input_blocks.N.K``, ``ResBlock.in_layers.2``, ``SpatialTransformer``,
``middle_block``, ``output_blocks``, ``time_embed``, ``label_emb``, ``out``) whose leaves are the very
modules of a tiny diffusers ``UNet2DConditionModel``; the containers' forwards run ldm's block order and
delegate each block to its diffusers original, so the output equals the diffusers U-Net's.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

OPENAI = "ldm.modules.diffusionmodules.openaimodel"


def _hidden(owner: nn.Module, name: str, module: nn.Module) -> None:
    object.__setattr__(owner, name, module)  # a reference that is not a registered submodule


class ResBlock(nn.Module):
    def __init__(self, r: nn.Module) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(r.norm1, nn.SiLU(), r.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), r.time_emb_proj)
        self.out_layers = nn.Sequential(r.norm2, nn.SiLU(), nn.Dropout(0.0), r.conv2)
        self.skip_connection = r.conv_shortcut if r.conv_shortcut is not None else nn.Identity()
        _hidden(self, "impl", r)

    def forward(self, x, emb):
        return self.impl(x, emb)


class SpatialTransformer(nn.Module):
    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        for name, child in t.named_children():
            self.add_module(name, child)
        _hidden(self, "impl", t)

    def forward(self, x, context=None):
        return self.impl(x, encoder_hidden_states=context, return_dict=False)[0]


class Downsample(nn.Module):
    def __init__(self, d: nn.Module) -> None:
        super().__init__()
        self.op = d.conv
        _hidden(self, "impl", d)

    def forward(self, x):
        return self.impl(x)


class Upsample(nn.Module):
    def __init__(self, u: nn.Module) -> None:
        super().__init__()
        self.conv = u.conv
        _hidden(self, "impl", u)

    def forward(self, x):
        return self.impl(x)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ldm ``UNetModel`` over a diffusers U-Net's modules."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        cfg = unet.config
        self.model_channels = cfg.block_out_channels[0]
        self.context_dim = cfg.cross_attention_dim
        self.time_embed = nn.Sequential(unet.time_embedding.linear_1, nn.SiLU(), unet.time_embedding.linear_2)
        if getattr(unet, "add_embedding", None) is not None:
            a = unet.add_embedding
            self.label_emb = nn.Sequential(nn.Sequential(a.linear_1, nn.SiLU(), a.linear_2))
        blocks = [TimestepEmbedSequential(unet.conv_in)]
        for down in unet.down_blocks:
            attns = getattr(down, "attentions", None)
            for j, r in enumerate(down.resnets):
                layers = [ResBlock(r)] + ([SpatialTransformer(attns[j])] if attns else [])
                blocks.append(TimestepEmbedSequential(*layers))
            if down.downsamplers:
                blocks.append(TimestepEmbedSequential(Downsample(down.downsamplers[0])))
        self.input_blocks = nn.ModuleList(blocks)
        mid = unet.mid_block
        self.middle_block = TimestepEmbedSequential(ResBlock(mid.resnets[0]), SpatialTransformer(mid.attentions[0]), ResBlock(mid.resnets[1]))
        outs = []
        for up in unet.up_blocks:
            attns = getattr(up, "attentions", None)
            for j, r in enumerate(up.resnets):
                layers = [ResBlock(r)] + ([SpatialTransformer(attns[j])] if attns else [])
                if j == len(up.resnets) - 1 and up.upsamplers:
                    layers.append(Upsample(up.upsamplers[0]))
                outs.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(outs)
        self.out = nn.Sequential(unet.conv_norm_out, nn.SiLU(), unet.conv_out)
        _hidden(self, "time_proj", unet.time_proj)
        _hidden(self, "diffusers_unet", unet)

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(self.time_proj(timesteps).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


for _cls in (ResBlock, SpatialTransformer, Downsample, Upsample, TimestepEmbedSequential, UNetModel):
    _cls.__module__ = OPENAI


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class OpenAIWrapper(DiffusionWrapper):
    def forward(self, x, t, c, **kwargs):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


def toy_ids(prompts, vocab: int = 1000, length: int = 77) -> torch.Tensor:
    """A stand-in tokenizer: bos 0, one id per character, eos 2 then padding 1 (deterministic)."""
    rows = []
    for p in prompts:
        ids = [0] + [3 + (ord(c) * 7) % (vocab - 3) for c in p][: length - 2] + [2]
        rows.append(ids + [1] * (length - len(ids)))
    return torch.tensor(rows)


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, prompts):
        return self.transformer(input_ids=toy_ids(prompts).to(self.transformer.device)).last_hidden_state


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """A1111's hijack wrapper: ``.wrapped`` is the ldm/sgm embedder; it copies sgm's ``is_trainable``."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, "is_trainable", False)

    def forward(self, prompts):
        return self.wrapped(prompts)


# -- OpenCLIP (open_clip's module names: transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}) --


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)  # fused in_proj_weight
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 2 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(2 * width, width))]))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, batch_first) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    """The text half of ``open_clip.CLIP``."""

    def __init__(self, width: int, layers: int, *, batch_first: bool, projection: int | None = None) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(1000, width)
        self.positional_embedding = nn.Parameter(torch.randn(77, width) * 0.02)
        self.transformer = OpenCLIPTransformer(width, layers, 4, batch_first)
        self.ln_final = nn.LayerNorm(width)
        if projection:
            self.text_projection = nn.Parameter(torch.randn(width, projection) * width**-0.5)
        self.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu(1), persistent=False)

    @property
    def device(self):
        return self.token_embedding.weight.device

    def run(self, ids, stop: int | None = None):
        """Blocks ``[0, stop)`` over the embedded ids; returns every block's output (batch first)."""
        x = self.token_embedding(ids) + self.positional_embedding
        lnd = not self.transformer.batch_first
        if lnd:
            x = x.permute(1, 0, 2)
        outs = []
        for r in self.transformer.resblocks[:stop]:
            x = r(x, attn_mask=self.attn_mask)
            outs.append(x.permute(1, 0, 2) if lnd else x)
        return outs


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm's SD2 embedder: ``layer="penultimate"`` stops one block early."""

    def __init__(self, model: OpenCLIPText) -> None:
        super().__init__()
        self.model = model
        self.layer_idx = 1

    def forward(self, prompts):
        blocks = len(self.model.transformer.resblocks)
        return self.model.ln_final(self.model.run(toy_ids(prompts).to(self.model.device), blocks - self.layer_idx)[-1])


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm's SDXL second embedder: the penultimate block for cross-attention, the pooled projection of
    the last block's end-of-text token for the vector; ``is_trainable`` False as SDXL configures it."""

    is_trainable = False

    def __init__(self, model: OpenCLIPText) -> None:
        super().__init__()
        self.model = model
        self.layer_idx = 1

    def forward(self, prompts):
        ids = toy_ids(prompts).to(self.model.device)
        outs = self.model.run(ids)
        last = self.model.ln_final(outs[-1])
        eot = (ids == 2).int().argmax(dim=-1)
        pooled = last[torch.arange(ids.shape[0]), eot] @ self.model.text_projection
        return outs[-2], pooled


class FrozenOpenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    pass


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    pass


class ConcatTimestepEmbedderND(nn.Module):
    def __init__(self, outdim: int, key: str) -> None:
        super().__init__()
        self.outdim = outdim
        self.input_key = key

    def forward(self, x):
        b, d = x.shape
        from trainer.models.webui_runtime import sinusoid  # the independent check is against diffusers

        return sinusoid(x.reshape(-1), self.outdim).reshape(b, d * self.outdim)


def scaled_linear_alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64,
    )


def tiny_unet(sdxl: bool) -> UNet2DConditionModel:
    kw = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
    )
    if sdxl:
        kw.update(cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=48 + 6 * 8, transformer_layers_per_block=(1, 2), use_linear_projection=True)
    return UNet2DConditionModel(**kw)


def clip_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=64,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77, projection_dim=hidden)


class LatentDiffusion(nn.Module):
    """ldm ``LatentDiffusion`` (SD1) as A1111 1.10 holds it."""

    is_sd1, is_sd2, is_sdxl = True, False, False

    def __init__(self, seed: int = 0, parameterization: str = "eps") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = DiffusionWrapper(UNetModel(tiny_unet(sdxl=False)))
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedder(CLIPTextModel(clip_config(32))))
        self.first_stage_model = tiny_vae()
        self.scale_factor = 0.18215
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", scaled_linear_alphas())
        self.alphas_cumprod_original = self.alphas_cumprod
        self.eval()

    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model(prompts)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist

    def get_first_stage_encoding(self, posterior):
        return self.scale_factor * posterior.sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor).sample

    def apply_model(self, x_noisy, t, cond):
        if not isinstance(cond, dict):
            cond = {"c_crossattn": [cond]}
        return self.model(x_noisy, t, **cond)


class LatentDiffusionSD2(LatentDiffusion):
    """ldm ``LatentDiffusion`` with SD2's OpenCLIP text encoder (penultimate layer) and v-prediction."""

    is_sd1, is_sd2, is_sdxl = False, True, False

    def __init__(self, seed: int = 0, parameterization: str = "v") -> None:
        super().__init__(seed, parameterization)
        torch.manual_seed(seed + 100)
        self.cond_stage_model = FrozenOpenCLIPEmbedderWithCustomWords(FrozenOpenCLIPEmbedder(OpenCLIPText(32, 3, batch_first=True)))
        self.eval()


class GeneralConditioner(nn.Module):
    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch):
        crossattn, vector = [], []
        for emb in self.embedders:
            with nullcontext() if getattr(emb, "is_trainable", False) else torch.no_grad():  # as sgm
                if isinstance(emb, ConcatTimestepEmbedderND):
                    vector.append(emb(batch[emb.input_key]))
                    continue
                out = emb(batch["txt"])
            if isinstance(out, tuple):
                c, pooled = out
                vector.insert(0, pooled)
            else:
                c = out
            crossattn.append(c)
        return {"crossattn": torch.cat(crossattn, 2), "vector": torch.cat(vector, 1)}


class DiffusionEngine(nn.Module):
    """sgm ``DiffusionEngine`` (SDXL) as A1111 1.10 extends it."""

    is_sd1, is_sd2, is_sdxl = False, False, True

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = OpenAIWrapper(UNetModel(tiny_unet(sdxl=True)))
        self.conditioner = GeneralConditioner([
            FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedder(CLIPTextModel(clip_config(32)))),
            FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedder2(OpenCLIPText(48, 2, batch_first=False, projection=48))),
            ConcatTimestepEmbedderND(8, "original_size_as_tuple"),
            ConcatTimestepEmbedderND(8, "crop_coords_top_left"),
            ConcatTimestepEmbedderND(8, "target_size_as_tuple"),
        ])
        self.first_stage_model = tiny_vae()
        self.scale_factor = 0.13025
        self.parameterization = "eps"
        self.alphas_cumprod = scaled_linear_alphas()
        self.eval()

    def get_learned_conditioning(self, batch):
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        n = len(batch)
        conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
            "crop_coords_top_left": torch.tensor([0, 0]).repeat(n, 1),
            "target_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
        }
        return self.conditioner(conds)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).latent_dist.sample()

    def get_first_stage_encoding(self, x):
        return x

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor).sample

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)


LatentDiffusion.__module__ = LatentDiffusionSD2.__module__ = "ldm.models.diffusion.ddpm"
DiffusionEngine.__module__ = "sgm.models.diffusion"
