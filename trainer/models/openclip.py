"""OpenCLIP text encoders (the Web-UI's SD2 encoder and SDXL's second one) seen through Hugging Face names.

OpenCLIP blocks hold attention in a ``torch.nn.MultiheadAttention`` whose q, k and v projections are one
fused ``in_proj_weight`` that ``F.multi_head_attention_forward`` reads directly: there is no q/k/v module
to adapt. Kohya LoRAs nevertheless name them separately (``…_self_attn_q_proj``), and the Lora extension
folds them back onto the fused weight at load time.

So, for the length of a job, :func:`unfuse_attention` gives each such attention an instance ``forward``
that projects through three :class:`SplitProjection` views of the fused weight (no copy, no new
parameters) and calls ``out_proj`` as a module. Adapters then attach to the views like to any Linear.
:func:`hf_view` arranges the views, ``out_proj`` and the MLP's ``c_fc``/``c_proj`` under Hugging Face CLIP
paths (``text_model.encoder.layers.N.self_attn.q_proj``, ``…mlp.fc1``), which is what target selection
and the kohya names expect. :func:`refuse_attention` puts the original forward back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_UNFUSED = "__traintrain_unfused__"


class SplitProjection(nn.Linear):
    """One of q, k, v: a Linear whose weight and bias are views of a fused ``in_proj`` (rows
    ``index * dim`` to ``(index + 1) * dim``). It owns no parameters: the fused ones stay the
    attention's, frozen and unchanged."""

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no parameters of our own
        self.__dict__["attention"] = attention  # a plain reference, not a submodule
        self.index = index
        self.in_features = self.out_features = attention.embed_dim

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        d = self.out_features
        return self.attention.in_proj_weight[self.index * d:(self.index + 1) * d]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = self.attention.in_proj_bias
        d = self.out_features
        return None if b is None else b[self.index * d:(self.index + 1) * d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """MultiheadAttention's mask convention (bool: True = masked out; float: added) as an additive mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _unfused_forward(attention: nn.MultiheadAttention, q_proj: SplitProjection, k_proj: SplitProjection,
                     v_proj: SplitProjection):
    heads = attention.num_heads

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if not attention.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, dim = query.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n, -1, heads, dim // heads).transpose(1, 2)

        q, k, v = split(q_proj(query)), split(k_proj(key)), split(v_proj(value))
        mask = _additive_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (N * heads, L, S)
            mask = mask.reshape(n, heads, length, -1)
        padding = _additive_mask(key_padding_mask, q.dtype)
        if padding is not None:  # (N, S) -> (N, 1, 1, S)
            padding = padding[:, None, None, :]
            mask = padding if mask is None else mask + padding
        dropout = attention.dropout if attention.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=bool(is_causal and mask is None))
        out = attention.out_proj(out.transpose(1, 2).reshape(n, length, dim))
        if not attention.batch_first:
            out = out.transpose(0, 1)
        return out, None  # OpenCLIP asks for need_weights=False; the weights are never computed

    setattr(forward, _UNFUSED, (q_proj, k_proj, v_proj))
    return forward


def unfuse_attention(attention: nn.MultiheadAttention) -> tuple[SplitProjection, SplitProjection, SplitProjection]:
    """Route ``attention`` through separate q/k/v views (idempotent) and return them.

    Raises:
        ValueError: the attention is not a self-attention with one fused ``in_proj_weight``.
    """
    existing = getattr(attention.__dict__.get("forward"), _UNFUSED, None)
    if existing is not None:
        return existing
    if attention.in_proj_weight is None or not getattr(attention, "_qkv_same_embed_dim", True):
        raise ValueError("only MultiheadAttention with a fused in_proj_weight can be unfused")
    if "forward" in attention.__dict__:
        raise ValueError("this MultiheadAttention already has an instance forward; refusing to stack on it")
    views = (SplitProjection(attention, 0), SplitProjection(attention, 1), SplitProjection(attention, 2))
    attention.forward = _unfused_forward(attention, *views)
    return views


def refuse_attention(attention: nn.MultiheadAttention) -> bool:
    """Undo :func:`unfuse_attention`; True when it had been unfused."""
    if getattr(attention.__dict__.get("forward"), _UNFUSED, None) is None:
        return False
    del attention.__dict__["forward"]
    return True


def resblocks_of(transformer: Any) -> list[nn.Module]:
    """The OpenCLIP ``transformer.resblocks`` list (empty when ``transformer`` is not OpenCLIP-shaped)."""
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    ok = all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) and hasattr(getattr(b, "mlp", None), "c_fc")
             for b in blocks)
    return list(blocks) if ok else []


class HFView(nn.Module):
    """The root :func:`hf_view` returns; ``attentions`` are the unfused attentions it exposes."""

    def __init__(self, text_model: nn.Module, attentions: list[nn.MultiheadAttention]) -> None:
        super().__init__()
        self.text_model = text_model
        self.__dict__["attentions"] = attentions  # plain list: the blocks stay the encoder's children


def hf_view(transformer: nn.Module, layers: int | None = None) -> HFView:
    """A module tree with Hugging Face CLIP paths over an OpenCLIP transformer, attention unfused.

    Args:
        transformer: the OpenCLIP ``transformer`` (with ``resblocks``).
        layers: how many leading blocks to expose (the ones the encoder runs: SD2 stops one block
            early, so its last block would never get a gradient); all when None.

    Raises:
        ValueError: not OpenCLIP-shaped, or an attention cannot be unfused (nothing is left changed).

    Returns:
        A root whose ``text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.{fc1,fc2}}`` are
        the live modules (the views, ``out_proj``, ``c_fc``, ``c_proj``). Nothing is copied.
    """
    blocks = resblocks_of(transformer)
    if not blocks:
        raise ValueError("not an OpenCLIP transformer (no resblocks with attn/mlp.c_fc)")
    exposed = []
    done: list[nn.MultiheadAttention] = []
    for block in blocks[:layers]:
        try:
            q, k, v = unfuse_attention(block.attn)
        except ValueError:
            for attention in done:  # all or nothing
                refuse_attention(attention)
            raise
        done.append(block.attn)
        attn = nn.Module()
        for name, module in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("out_proj", block.attn.out_proj)):
            attn.add_module(name, module)
        mlp = nn.Module()
        mlp.add_module("fc1", block.mlp.c_fc)
        mlp.add_module("fc2", block.mlp.c_proj)
        layer = nn.Module()
        layer.add_module("self_attn", attn)
        layer.add_module("mlp", mlp)
        exposed.append(layer)
    encoder = nn.Module()
    encoder.add_module("layers", nn.ModuleList(exposed))
    text_model = nn.Module()
    text_model.add_module("encoder", encoder)
    return HFView(text_model, [b.attn for b in blocks[:layers]])


def release_view(view: HFView) -> int:
    """Put every attention of an :func:`hf_view` back on its fused forward; returns how many."""
    return sum(refuse_attention(a) for a in view.attentions)
