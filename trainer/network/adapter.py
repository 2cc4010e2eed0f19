"""The shared shell of every adapter: the unregistered base module, multiplier, scale, attach/detach."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from trainer.network import patching


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a host's Linear that is not one: Forge's and Forge Neo's ``ForgeOperations.Linear``
    (``backend/operations.py``) is a plain ``nn.Module`` with ``in_features``/``out_features`` and a 2-D
    ``weight``, and every Linear of a model Neo loads is one (measured: only the U-Net's convolutions were
    selected there before)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.ndim == 2 and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))

class Adapter(nn.Module):
    """Base class of one adapter on one Linear or Conv2d.

    Subclasses set ``algo`` and ``weight_keys`` and implement ``delta_weight`` and ``_delta``.

    Args:
        kohya_name: the save name, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``.
        base: the Linear or Conv2d to adapt. Held outside the registered children, so its frozen
            weights never reach our state dict or optimizer.
        rank: the adapter rank r.
        alpha: the scale numerator; 0 means alpha = rank (scale 1).
        dtype: dtype of the adapter parameters (fp32 by default: they are trained).
        device: where the parameters live (defaults to the base weight's device).

    Attributes:
        multiplier: strength at forward time; 0 disables the adapter exactly.
        scale: alpha / rank, fixed at construction (or load).
    """

    algo: ClassVar[str] = ""
    weight_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        kohya_name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        assert is_linear(base) or isinstance(base, nn.Conv2d), f"{kohya_name}: cannot adapt {type(base).__name__}"
        assert rank > 0, f"{kohya_name}: rank must be positive"
        assert getattr(base, "padding_mode", "zeros") == "zeros", f"{kohya_name}: only zero-padded convs are supported"
        self.kohya_name = kohya_name
        self.__dict__["base"] = base  # plain attribute: not a submodule (R12)
        self.rank = int(rank)
        self.multiplier = 1.0
        # factory kwargs for the subclass's parameters; afterwards dtype/device follow the parameters
        self._factory = {"dtype": dtype, "device": torch.device(device) if device is not None else base.weight.device}
        alpha = float(alpha) if alpha else float(rank)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=self._factory["device"]))
        self.scale = alpha / self.rank
        self._attached = False

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the adapter parameters (inputs are cast to it), following ``.to()`` calls."""
        return next(self.parameters()).dtype

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def kind(self) -> str:
        """``"linear"``, ``"conv1x1"`` or ``"conv"`` (k > 1)."""
        if not self.is_conv:
            return "linear"
        return "conv1x1" if tuple(self.base.kernel_size) == (1, 1) else "conv"

    def refresh_scale(self) -> None:
        """Recompute ``scale`` after ``alpha`` was loaded (kept as a float so forward never syncs)."""
        self.scale = float(self.alpha) / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW at multiplier 1 (scale included), shaped like the base weight, in the adapter dtype."""
        raise NotImplementedError

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the base output for input ``x``, in ``x``'s dtype."""
        return (self._delta(x.to(self.dtype)) * (self.multiplier * self.scale)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus this adapter alone (for direct use and tests; patching uses forward_delta)."""
        return type(self.base).forward(self.base, x) + self.forward_delta(x)

    def scale_for_strength(self, tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """Scale saved tensors so the saved ΔW is ``strength`` times the trained one."""
        raise NotImplementedError

    def attach(self) -> None:
        """Add this adapter to the base module's patch list (idempotent)."""
        if not self._attached:
            patching.add_patch(self.base, self)
            self._attached = True

    def detach(self) -> None:
        """Remove this adapter from the base module's patch list (idempotent)."""
        if self._attached:
            patching.remove_patch(self.base, self)
            self._attached = False

    @torch.no_grad()
    def merge_into_base(self, sign: float = 1.0) -> None:
        """Add ``sign · multiplier · ΔW`` to the base weight (use -1 to undo)."""
        weight = self.base.weight
        weight.add_((self.delta_weight() * (sign * self.multiplier)).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"{self.kohya_name}, algo={self.algo}, rank={self.rank}, scale={self.scale:g}, kind={self.kind}"
