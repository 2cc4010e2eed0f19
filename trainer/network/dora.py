"""DoRA: a LoRA whose merged weight is renormalised per input column to a learned magnitude."""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import SettingsError
from trainer.network.functional import apply_weight_delta, column_norm, dora_delta_weight, lora_delta_weight
from trainer.network.lora import LoRAModule


class DoRAModule(LoRAModule):
    """A DoRA adapter (keys ``lora_down.weight``, ``lora_up.weight``, ``alpha``, ``dora_scale``).

    ``W' = (W + s·up·down) · m / ‖W + s·up·down‖_col`` with ``m = dora_scale`` of shape ``(1, in)``
    (``(1, in, 1, 1)`` for a conv): LyCORIS's ``wd_on_output=False`` layout, the one A1111 1.10's
    ``apply_weight_decompose`` handles correctly (Forge and ComfyUI detect either). At multiplier ``k`` the
    layer gets ``W + k·(W' − W)``, as those loaders apply it. ``m`` starts at the base weight's column
    norms, so a fresh adapter is a no-op. Our own implementation: no lycoris needed.

    Args: see :class:`~trainer.network.adapter.Adapter`.
    """

    algo = "dora"
    weight_keys = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")

    def __init__(self, kohya_name: str, base: nn.Module, rank: int, alpha: float, **kwargs) -> None:
        super().__init__(kohya_name, base, rank, alpha, **kwargs)
        with torch.no_grad():
            magnitude = column_norm(base.weight.detach().to(**self._factory))
        self.dora_scale = nn.Parameter(magnitude)
        self._merged: list[torch.Tensor] = []

    @property
    def kohya_module(self) -> str:
        return "lycoris.kohya"

    def delta_weight(self) -> torch.Tensor:
        base = self.base.weight.to(self.dtype)
        delta = lora_delta_weight(self.lora_up.weight, self.lora_down.weight, self.scale).reshape(base.shape)
        return dora_delta_weight(base, delta, self.dora_scale)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return apply_weight_delta(self.base, x, self.delta_weight())

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        # the decomposition is not linear in the multiplier: it scales the finished weight change
        return (self._delta(x.to(self.dtype)) * self.multiplier).to(x.dtype)

    @torch.no_grad()
    def merge_into_base(self, sign: float = 1.0) -> None:
        """Merge (``sign > 0``) or undo the last merge (``sign < 0``).

        ΔW depends on the base weight, so the undo subtracts the change that was added rather than
        recomputing it from the already-merged weight.
        """
        weight = self.base.weight
        if sign > 0:
            change = (self.delta_weight() * (sign * self.multiplier)).to(weight.dtype)
            self._merged.append(change)
            weight.add_(change)
        elif self._merged:
            weight.sub_(self._merged.pop())

    def scale_for_strength(self, tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        raise SettingsError(
            "network_strength",
            f"dora cannot bake a strength of {strength:g} into the file (the magnitude renormalisation is not "
            "linear); set network_strength to 1 and use the LoRA weight in the prompt instead",
        )
