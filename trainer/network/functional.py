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


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(small, large)`` with ``small * large == dimension`` for LoKr.

    With ``factor > 0`` dividing ``dimension`` the split is ``factor`` and its cofactor; otherwise the
    most balanced split whose small side does not exceed ``factor`` (any size when ``factor <= 0``).
    This reproduces LyCORIS's choice, so our LoKr has the same shapes (and parameter count) as theirs.

    Args:
        dimension: the size to split (e.g. a weight's out or in features).
        factor: the wanted small side, or ``-1`` for the most square split.

    Returns:
        ``(small, large)``.
    """
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return (min(factor, other), max(factor, other))
    limit = dimension if factor <= 0 else factor
    small, large = 1, dimension
    candidate = 2
    while candidate * candidate <= dimension and candidate <= limit:
        if dimension % candidate == 0:
            small, large = candidate, dimension // candidate
        candidate += 1
    return small, large


def lokr_delta_weight(w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """ΔW of a LoKr adapter: the Kronecker product ``w1 ⊗ w2`` times ``scale``.

    Args:
        w1: ``(a, c)``.
        w2: ``(b, d)`` for Linear, ``(b, d, kh, kw)`` for Conv2d (a ``w2_a @ w2_b`` product reshaped).
        scale: alpha / rank when w2 is factorised, else 1 (what A1111/ComfyUI apply).
        shape: the base weight's shape ``(a·b, c·d[, kh, kw])``.

    Returns:
        A tensor of ``shape``.
    """
    if w2.dim() == 4:
        # a 1×1 "kernel" on w1 makes the 4-D Kronecker product repeat w2's kernel per (i, j) block
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * scale


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every input column of ``weight`` (over out channels and kernel), in the ``(1, in[, 1, 1])``
    layout that A1111 1.10, Forge and ComfyUI use for a DoRA ``dora_scale`` of that shape.

    Args:
        weight: ``(out, in)`` or ``(out, in, kh, kw)``.

    Returns:
        ``(1, in)`` or ``(1, in, 1, 1)``.
    """
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norms.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2)))


def dora_delta_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """ΔW of DoRA (Liu et al. 2024) with per-input-column magnitude: ``(W + Δ)·m/‖W + Δ‖_col − W``.

    This is the weight change a loader applies at multiplier 1; at multiplier ``k`` it applies ``k`` times
    it (A1111 ``apply_weight_decompose`` then ``× multiplier``; ComfyUI ``weight_decompose``).

    Args:
        base: the frozen base weight, in the adapter dtype.
        delta: the scaled LoRA ΔW (same shape).
        magnitude: ``dora_scale``, ``(1, in[, 1, 1])``.

    Returns:
        A tensor shaped like ``base``.
    """
    merged = base + delta
    # a zero column stays zero (0 · m / tiny) instead of 0/0
    norm = column_norm(merged).clamp_min(torch.finfo(merged.dtype).tiny)
    return merged * (magnitude / norm) - base
