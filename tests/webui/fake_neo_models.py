"""Tiny Forge Neo Z-Image and Anima engines, shaped like the real ones where training meets them.

Written for these tests from the structure of Neo's files (fork nolanlane/sd-webui-forge-classic @ 6e1e0d5,
read in a real build): class and attribute names, call signatures and conventions are Neo's, the code is
ours and tiny.

* Engines ``ZImage`` (``backend/diffusion_engine/zimage.py``) and ``Anima`` (``anima.py``): not ``nn.Module``s;
  ``forge_objects.unet.model`` is a ``KModel`` with ``diffusion_model`` and a ``PredictionDiscreteFlow``
  predictor (shift 3.0, multiplier 1.0, from the model config's ``sampling_settings``); everything is built
  under ``torch.inference_mode()`` by ``forge_model_reload``; conditioning and the VAE run in inference mode.
* ``get_learned_conditioning`` returns a list with one tensor per prompt: Z-Image (L, D), the text encoder's
  penultimate layer over the chat-templated prompt at its own length; Anima (1, 512, D), the LLM adapter
  (kept on the text encoder, ``preprocess_text_embeds``) over Qwen3's last layer, zero-padded to 512.
  The Z-Image engine sets its predictor's shift from the prompt's ``distilled_cfg_scale`` (default 3.0).
* ``encode_first_stage`` takes (B, 3, H, W) in [-1, 1], hands the VAE (B, H, W, 3) in [0, 1] and applies the
  latent format (Flux's shift/scale; Wan 2.1's per-channel mean/std). Anima's VAE is a video VAE: it
  encodes one image as (1, C, 1, h, w), and its engine keeps only the first image of a batch.
* ``backend.nn.lumina.NextDiT``: fused ``attention.qkv``, ``attention.out``, ``feed_forward.w1/w2/w3`` in
  ``layers``, ``noise_refiner`` (modulated) and ``context_refiner`` (not), joint attention over caption +
  image tokens; ``forward(x, timesteps, context, num_tokens=None, attention_mask=None, …)`` with t = 1 − σ,
  returning the *negated* output (ε − x₀).
* ``backend.nn.anima.Anima`` (Cosmos ``MiniTrainDIT``): (B, C, T, H, W), a padding-mask channel,
  ``blocks.N.{self_attn,cross_attn}.{q,k,v,output}_proj`` and ``mlp.layer1/layer2``; output ε − x₀.
* ``KModel.apply_model``: ``denoised = x − σ · diffusion_model(x, predictor.timestep(σ), context=…)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import fake_forge_models
import torch
import torch.nn.functional as F
from torch import nn

QWEN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


ForgeLinear = fake_forge_models.ForgeLinear  # backend.operations.ForgeOperations.Linear: not an nn.Linear


@contextmanager
def forge_operations():
    """``using_forge_operations``: models built inside get Neo's Linear class."""
    backup = nn.Linear
    nn.Linear = ForgeLinear
    try:
        yield
    finally:
        nn.Linear = backup


def _init(module: nn.Module, seed: int, gain: float = 1.5) -> None:
    """Seeded weights, larger than PyTorch's defaults so a tiny model's output depends on its prompt."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        with torch.no_grad():
            if p.ndim > 1:
                p.copy_(noise * gain / math.sqrt(p[0].numel()))
            else:  # norm scales near 1, biases near 0
                p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))


class RMSNorm(nn.Module):
    """``nn.RMSNorm`` (torch ≥ 2.4) written out, so the fake also runs on the hosts' older torch."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = q.shape
    split = [t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, -1)


# -- Z-Image: backend/nn/lumina.py --------------------------------------------------------------------


class JointAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_local_heads = self.n_local_kv_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x, x_mask=None, freqs_cis=None, transformer_options=None):
        q, k, v = self.qkv(x).split([self.n_local_heads * self.head_dim] * 3, dim=-1)
        b, n, _ = x.shape
        q = self.q_norm(q.view(b, n, self.n_local_heads, -1)).flatten(2)
        k = self.k_norm(k.view(b, n, self.n_local_heads, -1)).flatten(2)
        return self.out(_attend(q, k, v, self.n_local_heads))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, modulation: bool = True) -> None:
        super().__init__()
        self.attention = JointAttention(dim, n_heads)
        self.feed_forward = FeedForward(dim, 2 * dim)
        self.attention_norm1, self.attention_norm2 = RMSNorm(dim), RMSNorm(dim)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(dim), RMSNorm(dim)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 4 * dim))

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options=None):
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            h = self.attention(self.attention_norm1(x) * (1 + scale_msa.unsqueeze(1)), x_mask, freqs_cis)
            x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(h)
            h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
            return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(h)
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, freqs_cis))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x, c):
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c).unsqueeze(1)))


class NextDiT(nn.Module):
    """Z-Image's transformer as Neo builds it (``config`` is the dict the loader sets)."""

    def __init__(self, dim: int = 32, n_heads: int = 2, n_layers: int = 2, n_refiner_layers: int = 1,
                 in_channels: int = 16, cap_feat_dim: int = 24, patch_size: int = 2, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.time_scale, self.dim = patch_size, time_scale, dim
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.noise_refiner = nn.ModuleList([JointTransformerBlock(dim, n_heads) for _ in range(n_refiner_layers)])
        self.context_refiner = nn.ModuleList([JointTransformerBlock(dim, n_heads, modulation=False) for _ in range(n_refiner_layers)])
        self.t_embedder = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim), nn.Linear(cap_feat_dim, dim))
        self.layers = nn.ModuleList([JointTransformerBlock(dim, n_heads) for _ in range(n_layers)])
        self.final_layer = FinalLayer(dim, patch_size * patch_size * in_channels)
        self.pos = nn.Parameter(torch.zeros(256, dim))  # stands in for NextDiT's RoPE: image tokens know their place
        self.config = {"dim": dim, "n_heads": n_heads, "n_layers": n_layers, "n_refiner_layers": n_refiner_layers,
                       "in_channels": in_channels, "cap_feat_dim": cap_feat_dim, "patch_size": patch_size}

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options=None, **kwargs):
        t = 1.0 - timesteps
        b, c, h, w = x.shape
        p = self.patch_size
        adaln = self.t_embedder(_sinusoid(t * self.time_scale, 64).to(x.dtype))
        cap = self.cap_embedder(context)
        for layer in self.context_refiner:
            cap = layer(cap, attention_mask, None)
        img = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        img = self.x_embedder(img) + self.pos[: img.shape[1]]
        for layer in self.noise_refiner:
            img = layer(img, None, None, adaln)
        joint = torch.cat([cap, img], dim=1)
        for layer in self.layers:
            joint = layer(joint, None, None, adaln)
        out = self.final_layer(joint, adaln)[:, cap.shape[1]:]
        out = out.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return -out


# -- Anima: backend/nn/anima.py -----------------------------------------------------------------------


class SelfCrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, n_heads: int) -> None:
        super().__init__()
        inner, ctx = query_dim, context_dim or query_dim
        self.n_heads = n_heads
        self.q_proj, self.k_proj = nn.Linear(query_dim, inner, bias=False), nn.Linear(ctx, inner, bias=False)
        self.v_proj, self.output_proj = nn.Linear(ctx, inner, bias=False), nn.Linear(inner, query_dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(inner // n_heads), RMSNorm(inner // n_heads)

    def forward(self, x, context=None, rope_emb=None, transformer_options=None):
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.n_heads, -1)).flatten(2)
        k = self.k_norm(self.k_proj(context).view(b, context.shape[1], self.n_heads, -1)).flatten(2)
        return self.output_proj(_attend(q, k, self.v_proj(context), self.n_heads))


class GPT2FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.activation = nn.GELU()
        self.layer1, self.layer2 = nn.Linear(d_model, d_ff, bias=False), nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.layer2(self.activation(self.layer1(x)))


class Block(nn.Module):
    def __init__(self, x_dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfCrossAttention(x_dim, None, num_heads)
        self.layer_norm_cross_attn = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = SelfCrossAttention(x_dim, context_dim, num_heads)
        self.layer_norm_mlp = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(x_dim, 2 * x_dim)
        for name in ("adaln_modulation_self_attn", "adaln_modulation_cross_attn", "adaln_modulation_mlp"):
            setattr(self, name, nn.Sequential(nn.SiLU(), nn.Linear(x_dim, 3 * x_dim, bias=False)))

    def forward(self, x, emb, crossattn_emb, rope_emb_L_1_1_D=None, adaln_lora_B_T_3D=None,
                extra_per_block_pos_emb=None, transformer_options=None):
        b, t, h, w, d = x.shape
        for norm, mod, run in ((self.layer_norm_self_attn, self.adaln_modulation_self_attn, lambda y: self.self_attn(y)),
                               (self.layer_norm_cross_attn, self.adaln_modulation_cross_attn, lambda y: self.cross_attn(y, crossattn_emb)),
                               (self.layer_norm_mlp, self.adaln_modulation_mlp, self.mlp)):
            shift, scale, gate = (m.view(b, t, 1, 1, d) for m in mod(emb).chunk(3, dim=-1))
            y = (norm(x) * (1 + scale) + shift).reshape(b, t * h * w, d)
            x = x + gate * run(y).view(b, t, h, w, d)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, spatial: int, temporal: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.spatial, self.temporal = spatial, temporal
        self.proj = nn.Sequential(nn.Linear(in_channels * spatial * spatial * temporal, out_channels, bias=False))

    def forward(self, x):
        b, c, t, h, w = x.shape
        p, r = self.spatial, self.temporal
        x = x.view(b, c, t // r, r, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return self.proj(x.flatten(4))


class Anima(nn.Module):
    """Anima's Cosmos-Predict2 transformer (``MiniTrainDIT``) on (B, C, T, H, W)."""

    def __init__(self, model_channels: int = 32, num_blocks: int = 2, num_heads: int = 2, in_channels: int = 16,
                 crossattn_emb_channels: int = 24, patch_spatial: int = 2, patch_temporal: int = 1) -> None:
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_spatial, self.patch_temporal, self.concat_padding_mask = patch_spatial, patch_temporal, True
        self.x_embedder = PatchEmbed(patch_spatial, patch_temporal, in_channels + 1, model_channels)
        self.t_embedder = nn.Sequential(nn.Linear(model_channels, model_channels), nn.SiLU(), nn.Linear(model_channels, model_channels))
        self.t_embedding_norm = RMSNorm(model_channels)
        self.blocks = nn.ModuleList([Block(model_channels, crossattn_emb_channels, num_heads) for _ in range(num_blocks)])
        self.final_layer = FinalLayer(model_channels, patch_spatial * patch_spatial * patch_temporal * in_channels)
        self.pos = nn.Parameter(torch.zeros(256, model_channels))  # stands in for the 3D RoPE
        self.model_channels = model_channels
        self.config = {"model_channels": model_channels, "num_blocks": num_blocks, "num_heads": num_heads}

    def forward(self, x, timesteps, context, fps=None, padding_mask=None, **kwargs):
        b, c, t, h, w = x.shape
        pad = torch.zeros(b, 1, t, h, w, dtype=x.dtype, device=x.device) if padding_mask is None else padding_mask
        tokens = self.x_embedder(torch.cat([x, pad], dim=1))
        _, tt, hh, ww, d = tokens.shape
        tokens = tokens + self.pos[: hh * ww].view(1, 1, hh, ww, d)
        emb = self.t_embedding_norm(self.t_embedder(_sinusoid(timesteps.reshape(b) * 1000, d).to(x.dtype)))[:, None]
        for block in self.blocks:
            tokens = block(tokens, emb, context)
        out = self.final_layer(tokens.reshape(b, -1, d), emb[:, 0])
        p, r = self.patch_spatial, self.patch_temporal
        out = out.view(b, tt, hh, ww, p, p, r, c).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, c, t, h, w)


# -- text: backend/nn/llm/llama.py + backend/text_processing/{qwen3,anima}_engine.py ------------------


class ByteTokenizer:
    """Stands in for Qwen's and T5's tokenizers (called as Neo calls them: a list of texts → lists of ids)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, texts, truncation=False, add_special_tokens=True, **_):
        return {"input_ids": [[self.offset + b for b in t.encode("utf-8")] for t in texts]}


class LLMAdapter(nn.Module):
    """Anima's adapter: T5 token ids attend to Qwen3's hidden states (kept on the text encoder in Neo)."""

    def __init__(self, source_dim: int = 24, target_dim: int = 24, vocab: int = 300) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, target_dim)
        self.cross = SelfCrossAttention(target_dim, source_dim, 2)
        self.out_proj = nn.Linear(target_dim, target_dim)
        self.norm = RMSNorm(target_dim)

    def forward(self, source_hidden_states, target_input_ids, target_attention_mask=None, source_attention_mask=None):
        x = self.embed(target_input_ids)
        x = x + self.cross(x, source_hidden_states)
        return self.norm(self.out_proj(x))


class Qwen3(nn.Module):
    """A tiny causal stack with Neo's Llama call: ``(input_ids, attention_mask, embeds, num_tokens,
    intermediate_output)`` → ``(last, intermediate)``."""

    def __init__(self, dim: int = 24, layers: int = 3, vocab: int = 300, adapter: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
                                     for _ in range(layers)])
        self.norm = RMSNorm(dim)
        if adapter:
            self.llm_adapter = LLMAdapter(dim, dim, vocab)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None, **_):
        x = self.embed_tokens(input_ids) if embeds is None else embeds
        causal = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1)
        stop = None if intermediate_output is None else len(self.layers) + intermediate_output
        intermediate = None
        for i, layer in enumerate(self.layers):
            x = layer(x, src_mask=causal)
            if i == stop:
                intermediate = x.clone()
        return self.norm(x), intermediate

    def preprocess_text_embeds(self, text_embeds, text_ids):
        return self.llm_adapter(text_embeds, text_ids)


class Qwen3TextProcessingEngine:
    """Z-Image: chat template, penultimate layer, each prompt at its own length."""

    def __init__(self, text_encoder: Qwen3, tokenizer: ByteTokenizer) -> None:
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def __call__(self, texts):
        zs = []
        for line in texts:
            ids = torch.tensor([self.tokenizer([QWEN_TEMPLATE.format(line)])["input_ids"][0]])
            embeds = self.text_encoder.get_input_embeddings()(ids)
            _, z = self.text_encoder(None, attention_mask=None, embeds=embeds, intermediate_output=-2)
            zs.append(z[0])
        return zs


class AnimaTextProcessingEngine:
    """Anima: Qwen3's last layer over the raw prompt (one pad token if empty), the adapter over the T5 ids
    (+ eos 1), zero-padded to 512 tokens."""

    id_pad, id_end = 299, 1

    def __init__(self, text_encoder: Qwen3, qwen_tokenizer: ByteTokenizer, t5_tokenizer: ByteTokenizer) -> None:
        self.text_encoder, self.qwen_tokenizer, self.t5_tokenizer = text_encoder, qwen_tokenizer, t5_tokenizer

    def __call__(self, texts):
        zs = []
        for line in texts:
            qwen = self.qwen_tokenizer([line], add_special_tokens=False)["input_ids"][0] or [self.id_pad]
            t5 = self.t5_tokenizer([line], add_special_tokens=False)["input_ids"][0] + [self.id_end]
            z, _ = self.text_encoder(None, embeds=self.text_encoder.get_input_embeddings()(torch.tensor([qwen])))
            cross = self.text_encoder.preprocess_text_embeds(z, torch.tensor([t5]))
            zs.append(F.pad(cross, (0, 0, 0, max(0, 512 - cross.shape[1]))))
        return zs


# -- VAE: backend/patcher/vae.py + the latent formats -------------------------------------------------


class AutoencoderKL(nn.Module):
    """A tiny VAE (8× down, 16 channels); ``video`` folds the time axis as Wan's 3D VAE does."""

    def __init__(self, video: bool = False) -> None:
        super().__init__()
        self.video = video
        self.encoder = nn.Conv2d(3, 16, 8, stride=8)
        self.decoder = nn.ConvTranspose2d(16, 3, 8, stride=8)
        self.config = {"z_dim": 16} if video else {"latent_channels": 16}
        if video:
            self.latents_mean, self.latents_std = torch.tensor(WAN_MEAN), torch.tensor(WAN_STD)

    def _fold(self, x, fn):
        if not self.video:
            return fn(x)
        b, c, t, h, w = x.shape
        y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def encode(self, x):
        return self._fold(x, self.encoder)

    def decode(self, z):
        return self._fold(z, self.decoder)

    def process_in(self, z):
        if not self.video:
            return (z - 0.1159) * 0.3611
        shape = (1, 16, 1, 1, 1)
        return (z - self.latents_mean.view(shape).to(z)) / self.latents_std.view(shape).to(z)

    def process_out(self, z):
        if not self.video:
            return z / 0.3611 + 0.1159
        shape = (1, 16, 1, 1, 1)
        return z * self.latents_std.view(shape).to(z) + self.latents_mean.view(shape).to(z)


class VAE:
    """Neo's VAE patcher: pixels (B, H, W, 3) in [0, 1] in and out; a video VAE sees a batch as frames."""

    def __init__(self, model: AutoencoderKL, is_wan: bool = False) -> None:
        self.first_stage_model, self.is_wan = model.eval(), is_wan

    def encode(self, pixels):
        x = pixels.movedim(-1, 1)
        if self.is_wan and x.ndim < 5:
            x = x.movedim(1, 0).unsqueeze(0)
        return self.first_stage_model.encode(x * 2.0 - 1.0).float()

    def decode(self, z):
        out = self.first_stage_model.decode(z).float()
        return torch.clamp((out + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)


# -- KModel, predictor, engines -----------------------------------------------------------------------


class PredictionDiscreteFlow(nn.Module):
    """``backend.modules.k_prediction.PredictionDiscreteFlow``: σ shifted by s·t/(1+(s−1)t), timestep = σ·multiplier."""

    def __init__(self, sampling_settings: dict) -> None:
        super().__init__()
        self.shift, self.multiplier = 1.0, 1000.0
        self.set_parameters(shift=sampling_settings.get("shift", 1.0), multiplier=sampling_settings.get("multiplier", 1000))

    def set_parameters(self, *, shift=None, multiplier=None, timesteps=1000):
        self.shift, self.multiplier = shift or self.shift, multiplier or self.multiplier
        t = torch.arange(1, timesteps + 1) / timesteps
        self.register_buffer("sigmas", self.shift * t / (1 + (self.shift - 1) * t))

    def timestep(self, sigma):
        return sigma * self.multiplier


class ModelConfig:
    """The ``huggingface_guess`` entry the loader matched (``model_list.ZImage`` / ``model_list.Anima``)."""

    def __init__(self, huggingface_repo: str) -> None:
        self.huggingface_repo = huggingface_repo
        self.sampling_settings = {"multiplier": 1.0, "shift": 3.0}


class KModel(fake_forge_models.KModel):
    def __init__(self, diffusion_model: nn.Module, config: ModelConfig) -> None:
        super().__init__(diffusion_model, PredictionDiscreteFlow(config.sampling_settings))
        self.config = config

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        """``x − σ · model(x, timestep(σ), context)`` (prediction type "const"), inputs in the compute dtype."""
        xc, context = x.to(self.computation_dtype), c_crossattn.to(self.computation_dtype)
        out = self.diffusion_model(xc, self.predictor.timestep(t).float(), context=context).float()
        return x - out * t.view(-1, *([1] * (out.ndim - 1)))


class _Clip:
    def __init__(self, cond_stage_model: nn.Module) -> None:
        self.cond_stage_model = cond_stage_model


class _NeoEngine(fake_forge_models.ForgeDiffusionEngine):
    """Neo's DiT engines. ``storage_dtype`` bf16 is what Neo does on CPU (and with ``--bf16-unet``): weights
    stored in bf16, computation in fp32, each Linear casting its weight per call."""

    def __init__(self, transformer: nn.Module, text_encoder: Qwen3, vae: VAE, repo: str,
                 storage_dtype: torch.dtype = torch.float32) -> None:
        self.model_config = ModelConfig(repo)
        kmodel = KModel(transformer, self.model_config)
        if storage_dtype != torch.float32:
            transformer.to(storage_dtype)
            for m in transformer.modules():
                if isinstance(m, ForgeLinear):
                    m.parameters_manual_cast = True
            kmodel.storage_dtype, kmodel.computation_dtype = storage_dtype, torch.float32
        unet = fake_forge_models.UnetPatcher(kmodel)
        clip = _Clip(nn.ModuleDict({self.clip_name: text_encoder}))
        self.hold(fake_forge_models.ForgeObjects(unet, clip, vae))

    def get_first_stage_encoding(self, x):
        return x

    @torch.inference_mode()
    def generate(self, x: torch.Tensor, sigma: torch.Tensor, prompts) -> torch.Tensor:
        """One denoised prediction as a generation computes it (inference mode, Neo's ``apply_model``)."""
        context = torch.stack([c.reshape(-1, c.shape[-1]) for c in self.get_learned_conditioning(prompts)])
        return self.forge_objects.unet.model.apply_model(x, sigma, c_crossattn=context)


class ZImage(_NeoEngine):
    clip_name = "qwen3"

    def __init__(self, seed: int = 3, storage_dtype: torch.dtype = torch.float32) -> None:
        with forge_operations():
            dit, te = NextDiT(), Qwen3()
        _init(dit, seed)
        _init(te, seed + 1)
        vae = AutoencoderKL()
        _init(vae, seed + 2, gain=1.0)
        super().__init__(dit, te, VAE(vae), "Tongyi-MAI/Z-Image-Turbo", storage_dtype)
        self.text_processing_engine_gemma = Qwen3TextProcessingEngine(te, ByteTokenizer(3))

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        shift = getattr(prompt, "distilled_cfg_scale", 3.0)
        self.forge_objects.unet.model.predictor.set_parameters(shift=shift)
        return self.text_processing_engine_gemma(prompt)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        return self.forge_objects.vae.first_stage_model.process_in(sample).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        sample = self.forge_objects.vae.first_stage_model.process_out(x)
        return (self.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0).to(x)


class AnimaEngine(_NeoEngine):
    clip_name = "qwen3_06b"

    def __init__(self, seed: int = 5, storage_dtype: torch.dtype = torch.float32) -> None:
        with forge_operations():
            dit, te = Anima(), Qwen3(adapter=True)
        _init(dit, seed)
        _init(te, seed + 1)
        vae = AutoencoderKL(video=True)
        _init(vae, seed + 2, gain=1.0)
        super().__init__(dit, te, VAE(vae, is_wan=True), "circlestone-labs/Anima", storage_dtype)
        self.is_wan = True
        self.text_processing_engine_anima = AnimaTextProcessingEngine(te, ByteTokenizer(3), ByteTokenizer(3))

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        return self.text_processing_engine_anima(prompt)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        if x.size(0) > 1:
            x = x[0].unsqueeze(0)  # Neo: "enforce batch_size of 1"
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        return self.forge_objects.vae.first_stage_model.process_in(sample).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        sample = self.forge_objects.vae.first_stage_model.process_out(x)
        return (self.forge_objects.vae.decode(sample).movedim(-1, 2) * 2.0 - 1.0).to(x)


AnimaEngine.__name__ = AnimaEngine.__qualname__ = "Anima"  # Neo's class name (the transformer is also "Anima")
for _cls, _module in ((NextDiT, "backend.nn.lumina"), (JointTransformerBlock, "backend.nn.lumina"),
                      (Anima, "backend.nn.anima"), (Block, "backend.nn.anima"),
                      (ZImage, "backend.diffusion_engine.zimage"), (AnimaEngine, "backend.diffusion_engine.anima")):
    _cls.__module__ = _module


def neo_zimage(seed: int = 3, storage_dtype: torch.dtype = torch.float32) -> ZImage:
    """Built as ``forge_model_reload`` builds it (call it under inference mode to match Neo)."""
    return ZImage(seed, storage_dtype)


def neo_anima(seed: int = 5, storage_dtype: torch.dtype = torch.float32) -> AnimaEngine:
    return AnimaEngine(seed, storage_dtype)
