"""LoRA (Linear, 1×1 conv) and LoCon (k×k conv): y = f(x) + m · (α/r) · up(down(x))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.network.adapter import Adapter
from trainer.network.functional import lora_delta_weight


class LoRAModule(Adapter):
    """A LoRA/LoCon adapter (kohya keys ``lora_down.weight``, ``lora_up.weight``, ``alpha``).

    ``lora_down`` is a Linear in→r, or a Conv2d in→r with the base kernel, stride, padding and
    dilation; ``lora_up`` is a Linear r→out or a 1×1 Conv2d r→out. Down is Kaiming-uniform (a=√5),
    up is zero, so a fresh adapter is an exact no-op. Both are applied with ``F.linear``/``F.conv2d``
    on their weights so host class-level patches of ``nn.Linear``/``nn.Conv2d`` never touch them.

    Args: see :class:`~trainer.network.adapter.Adapter`.
    """

    algo = "lora"
    weight_keys = ("lora_down.weight", "lora_up.weight", "alpha")

    def __init__(self, kohya_name: str, base: nn.Module, rank: int, alpha: float, **kwargs) -> None:
        super().__init__(kohya_name, base, rank, alpha, **kwargs)
        factory = self._factory
        if self.is_conv:
            assert base.groups == 1, f"{kohya_name}: grouped convolutions are not supported"
            self.lora_down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **factory
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def kohya_module(self) -> str:
        """``networks.lora`` for plain LoRA, the same module name kohya writes for LoCon."""
        return "networks.lora"

    def delta_weight(self) -> torch.Tensor:
        return lora_delta_weight(self.lora_up.weight, self.lora_down.weight, self.scale)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            d = self.lora_down
            hidden = F.conv2d(x, d.weight, None, d.stride, d.padding, d.dilation)
            return F.conv2d(hidden, self.lora_up.weight)
        return F.linear(F.linear(x, self.lora_down.weight), self.lora_up.weight)

    def scale_for_strength(self, tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        # √strength on both factors: ΔW = up·down scales by strength (reference §8.9 step 3)
        root = math.sqrt(strength)
        return {k: (v * root if k != "alpha" else v) for k, v in tensors.items()}

    @staticmethod
    def rank_from_tensors(tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a saved adapter (first dimension of its down weight)."""
        return int(tensors["lora_down.weight"].shape[0])
