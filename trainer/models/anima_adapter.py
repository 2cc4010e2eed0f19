"""Anima's LLM adapter: turns Qwen3-0.6B hidden states into the DiT's cross-attention context.

The prompt's T5 token ids are embedded and, through a few blocks of (self-attention, cross-attention to
the Qwen3 states, MLP), become the context, one row per T5 token. Module names and maths follow the released
Anima files as Forge Neo runs them (``backend/nn/anima.py``): ``llm_adapter.embed``,
``blocks.N.{self_attn,cross_attn}.{q,k,v,o}_proj`` with per-head RMS ``q_norm``/``k_norm``, RMS
``norm_self_attn``/``norm_cross_attn``/``norm_mlp``, ``mlp.0/2``, ``out_proj``, a final RMS ``norm``; rotary
positions (θ = 10000, half-split rotation) on queries by T5 position and on keys by their own sequence's
position. So a real Anima file's adapter loads into this module and computes what Neo computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight (``nn.RMSNorm`` is torch >= 2.4; the hosts run 2.1)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(length: int, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (length, head_dim) for positions 0..length-1, computed in float32."""
    inv = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=like.device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(length, device=like.device, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = self.q_norm(heads(self.q_proj(x))), self.k_norm(heads(self.k_proj(context))), heads(self.v_proj(context))
        q = _rotate(q, *_rope(q.shape[2], q.shape[-1], q))
        k = _rotate(k, *_rope(k.shape[2], k.shape[-1], k))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class _Block(nn.Module):
    def __init__(self, dim: int, source_dim: int, heads: int, layer_norm: bool) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.LayerNorm(dim) if layer_norm else RMSNorm(dim)

        self.norm_self_attn, self.norm_cross_attn, self.norm_mlp = norm(), norm(), norm()
        self.self_attn = _Attention(dim, dim, heads)
        self.cross_attn = _Attention(dim, source_dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, source_mask)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Args: source_dim: Qwen3 hidden size; target_dim: the DiT's context size; model_dim: the adapter's
    width; num_layers, num_heads: its depth and heads; vocab_size: the T5 vocabulary (32128 for real Anima);
    layer_norm: LayerNorm instead of the released files' RMSNorm."""

    def __init__(self, source_dim: int, target_dim: int, model_dim: int, num_layers: int = 6, num_heads: int = 16,
                 vocab_size: int = 32128, layer_norm: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, target_dim)
        self.in_proj = nn.Linear(target_dim, model_dim) if model_dim != target_dim else nn.Identity()
        self.blocks = nn.ModuleList(_Block(model_dim, source_dim, num_heads, layer_norm) for _ in range(num_layers))
        self.out_proj = nn.Linear(model_dim, target_dim)
        self.norm = nn.LayerNorm(target_dim) if layer_norm else RMSNorm(target_dim)

    def forward(self, source: torch.Tensor, target_ids: torch.Tensor, *, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(self.embed(target_ids))
        for block in self.blocks:
            x = block(x, source, source_mask)
        return self.norm(self.out_proj(x))
