"""LoKr: ΔW = (w1 ⊗ w2) · scale, our own implementation with LyCORIS key names (no lycoris needed)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.network.adapter import Adapter
from trainer.network.functional import apply_weight_delta, factorization, lokr_delta_weight


class LoKrModule(Adapter):
    """A LoKr adapter (keys ``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``, ``alpha``).

    The base weight ``(out, in[, kh, kw])`` is split as ``out = a·b``, ``in = c·d`` (LyCORIS's
    :func:`~trainer.network.functional.factorization`); ``w1`` is a full ``(a, c)`` matrix and ``w2``
    carries the kernel: a full ``(b, d[, kh, kw])`` tensor, or ``w2_a (b, r) @ w2_b (r, d·kh·kw)`` when the
    rank is below half of ``max(b, d)`` (LyCORIS's rule). The loaders (A1111 1.10 ``network_lokr``,
    ComfyUI/Forge ``lokr``) scale by alpha / rank only when a factor is split, else by 1; we do the same.
    Init: ``w1`` and ``w2_a`` Kaiming-uniform (a=√5), ``w2``/``w2_b`` zero, so ΔW starts at exactly zero.

    Args:
        kohya_name, base, rank, alpha: see :class:`~trainer.network.adapter.Adapter`.
        factor: the wanted small side of each split, ``-1`` for the most square one.
        w1_shape: ``(a, c)`` taken from a file instead of computed.
        full_w2: force (True) or forbid (False) a full ``w2``; None applies the rank rule.
        **kwargs: ``dtype``/``device`` for the parameters.
    """

    algo = "lokr"
    weight_keys = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha")

    def __init__(
        self,
        kohya_name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        factor: int = -1,
        w1_shape: tuple[int, int] | None = None,
        full_w2: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(kohya_name, base, rank, alpha, **kwargs)
        out_dim, in_dim, *kernel = base.weight.shape
        if w1_shape is None:
            w1_shape = (factorization(out_dim, factor)[0], factorization(in_dim, factor)[0])
        a, c = (int(v) for v in w1_shape)
        assert out_dim % a == 0 and in_dim % c == 0, f"{kohya_name}: w1 {w1_shape} does not divide {tuple(base.weight.shape)}"
        b, d = out_dim // a, in_dim // c
        self.full_w2 = bool(rank >= max(b, d) / 2 if full_w2 is None else full_w2)
        self._w2_shape = (b, d, *kernel)
        factory = self._factory
        self.lokr_w1 = nn.Parameter(torch.empty(a, c, **factory))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(*self._w2_shape, **factory))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, **factory))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * math.prod(kernel), **factory))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self.refresh_scale()

    @property
    def kohya_module(self) -> str:
        return "lycoris.kohya"

    def refresh_scale(self) -> None:
        # loaders use alpha / rank only when w2 is split; a full w2 is applied unscaled
        self.scale = 1.0 if self.full_w2 else float(self.alpha) / self.rank

    def _w2(self) -> torch.Tensor:
        if self.full_w2:
            return self.lokr_w2
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(self._w2_shape)

    def delta_weight(self) -> torch.Tensor:
        return lokr_delta_weight(self.lokr_w1, self._w2(), self.scale, self.base.weight.shape)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return apply_weight_delta(self.base, x, self.delta_weight())

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        # the scale is already inside delta_weight(); only the multiplier is applied here
        return (self._delta(x.to(self.dtype)) * self.multiplier).to(x.dtype)

    def scale_for_strength(self, tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        # ΔW is bilinear in (w1, w2): √strength on w1 and on w2 (or its a factor) scales it by strength
        root = math.sqrt(strength)
        return {k: (v * root if k in ("lokr_w1", "lokr_w2", "lokr_w2_a") else v) for k, v in tensors.items()}

    @staticmethod
    def rank_from_tensors(tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a saved adapter (``lokr_w2_b``'s first dimension; a full w2 has none: alpha or 1)."""
        if "lokr_w2_b" in tensors:
            return int(tensors["lokr_w2_b"].shape[0])
        return max(1, int(float(tensors["alpha"]))) if "alpha" in tensors else 1
