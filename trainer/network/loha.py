"""LoHa: ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · α/r, our own implementation with LyCORIS key names."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.network.adapter import Adapter
from trainer.network.functional import apply_weight_delta, loha_delta_weight


class LoHaModule(Adapter):
    """A LoHa adapter (keys ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``).

    ``w*_a`` are ``(out, r)``, ``w*_b`` are ``(r, in·kh·kw)``. Init follows LyCORIS's no-Tucker LoHa:
    w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0, so ΔW starts at exactly zero while every
    factor still receives a gradient. The delta is applied as a weight through the base layer's
    operation (``F.linear``/``F.conv2d`` with the base stride/padding/dilation), never merged in place.

    Args: see :class:`~trainer.network.adapter.Adapter`.
    """

    algo = "loha"
    weight_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")

    def __init__(self, kohya_name: str, base: nn.Module, rank: int, alpha: float, **kwargs) -> None:
        super().__init__(kohya_name, base, rank, alpha, **kwargs)
        out_dim = base.weight.shape[0]
        in_dim = math.prod(base.weight.shape[1:])
        factory = self._factory
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim, **factory))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, rank, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim, **factory))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    @property
    def kohya_module(self) -> str:
        return "lycoris.kohya"

    def delta_weight(self) -> torch.Tensor:
        return loha_delta_weight(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale, self.base.weight.shape
        )

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return apply_weight_delta(self.base, x, self.delta_weight())

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        # the scale is already inside delta_weight(); only the multiplier is applied here
        return (self._delta(x.to(self.dtype)) * self.multiplier).to(x.dtype)

    def scale_for_strength(self, tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        # ΔW is bilinear in (w1_a, w2_a): √strength on each scales it by strength
        root = math.sqrt(strength)
        return {k: (v * root if k in ("hada_w1_a", "hada_w2_a") else v) for k, v in tensors.items()}

    @staticmethod
    def rank_from_tensors(tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a saved adapter (first dimension of ``hada_w1_b``)."""
        return int(tensors["hada_w1_b"].shape[0])
