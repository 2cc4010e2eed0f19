"""Adapter delta formulas on bare tensors.

One source for the maths, shared by the adapter forwards, weight merging, effect checks and the
save-vs-train equality tests (style R14). Nothing here knows about modules or names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW of a LoRA/LoCon pair, shaped like the base weight.

    Args:
        up: ``(out, r)`` for Linear or ``(out, r, 1, 1)`` for Conv2d.
        down: ``(r, in)`` for Linear or ``(r, in, kh, kw)`` for Conv2d (the base kernel size).
        scale: alpha / rank.

    Returns:
        ``(out, in)`` or ``(out, in, kh, kw)``.
    """
    if down.dim() == 2:
        return (up @ down) * scale
    # conv: the 1x1 up projection mixes the r channels of the k×k down kernel
    return torch.einsum("or,rihw->oihw", up.flatten(1), down) * scale


def loha_delta_weight(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float, shape: torch.Size
) -> torch.Tensor:
    """ΔW of a LoHa adapter: the Hadamard product of two low-rank products (Hyeon-Woo et al., FedPara).

    Args:
        w1_a, w2_a: ``(out, r)``.
        w1_b, w2_b: ``(r, in * kh * kw)`` (flattened kernel for Conv2d).
        scale: alpha / rank.
        shape: the base weight's shape, to which the result is reshaped.

    Returns:
        A tensor of ``shape``.
    """
    return ((w1_a @ w1_b) * (w2_a @ w2_b) * scale).reshape(shape)


def apply_weight_delta(base: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Run ``x`` through the base layer's operation with weight ``delta`` and no bias.

    Args:
        base: the Linear or Conv2d whose stride/padding/dilation/groups are used.
        x: the layer input, already in ``delta``'s dtype.
        delta: a weight shaped like ``base.weight``.

    Returns:
        The contribution of ``delta`` to the layer output.
    """
    if delta.dim() == 2:
        return F.linear(x, delta)
    return F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
