"""Anima's LLM adapter: turns Qwen3-0.6B hidden states into the DiT's cross-attention context.

The prompt's T5 token ids are embedded and, through a few blocks of (self-attention, cross-attention to
the Qwen3 states, MLP), become the context, one row per T5 token. Module names follow the released
Anima files (``llm_adapter.embed``, ``blocks.N.{self_attn,cross_attn}.{q,k,v,o}_proj``, ``mlp.0/2``,
``out_proj``, ``norm``) so the same names serve saving and loading; rotary position terms are left out
(the built-in tiny model does not need them; loading real Anima weights is not offered yet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if hasattr(nn, "RMSNorm") else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if hasattr(nn, "RMSNorm") else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = self.q_norm(heads(self.q_proj(x))), self.k_norm(heads(self.k_proj(context))), heads(self.v_proj(context))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class _Block(nn.Module):
    def __init__(self, dim: int, source_dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self_attn, self.norm_cross_attn, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
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
    width; num_layers, num_heads: its depth and heads; vocab_size: the T5 vocabulary (32128 for real Anima)."""

    def __init__(self, source_dim: int, target_dim: int, model_dim: int, num_layers: int = 6, num_heads: int = 16,
                 vocab_size: int = 32128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, target_dim)
        self.in_proj = nn.Linear(target_dim, model_dim) if model_dim != target_dim else nn.Identity()
        self.blocks = nn.ModuleList(_Block(model_dim, source_dim, num_heads) for _ in range(num_layers))
        self.out_proj = nn.Linear(model_dim, target_dim)
        self.norm = nn.LayerNorm(target_dim)

    def forward(self, source: torch.Tensor, target_ids: torch.Tensor, *, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(self.embed(target_ids))
        for block in self.blocks:
            x = block(x, source, source_mask)
        return self.norm(self.out_proj(x))
