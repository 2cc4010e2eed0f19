"""``NetworkSpec``: the network settings as one validated value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.errors import SettingsError

BLOCK_IDS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
ALL = BLOCK_IDS
NETWORK_TYPES: tuple[str, ...] = ("lierla", "c3lier", "loha", "lokr", "dora")
ELEMENTS: tuple[str, ...] = ("Full", "CrossAttention", "SelfAttention")


@dataclass(frozen=True)
class NetworkSpec:
    """What network to build.

    Args:
        network_type: ``lierla`` (attention LoRA), ``c3lier`` (LoCon: + ResNet and sampler convs),
            ``loha``, ``lokr`` (Kronecker) or ``dora`` (attention LoRA with learned column magnitudes);
            all five are our own implementations (no lycoris-lora needed).
        rank: rank of Linear and 1×1 conv adapters.
        alpha: their alpha (scale = alpha / rank; 0 means alpha = rank).
        conv_rank: rank of k>1 conv adapters; 0 → ``rank``.
        conv_alpha: their alpha; 0 → ``alpha``.
        blocks: selected block IDs (``BASE`` = text encoders, ``IN00``..``OUT11``).
        element: ``Full``, ``CrossAttention`` (attn2 only) or ``SelfAttention`` (attn1 only); empty
            means ``Full`` (what the UI shows for an empty value).
        factor: LoKr only: the wanted small side of each Kronecker split; -1 = most square (LyCORIS default).

    Raises:
        SettingsError: a value outside its legal set, naming the settings key.
    """

    network_type: str
    rank: int
    alpha: float
    conv_rank: int = 0
    conv_alpha: float = 0.0
    blocks: tuple[str, ...] = ALL
    element: str = "Full"
    factor: int = -1

    def __post_init__(self) -> None:
        if self.network_type not in NETWORK_TYPES:
            raise SettingsError("network_type", f"unknown '{self.network_type}'; choose one of {', '.join(NETWORK_TYPES)}")
        if int(self.rank) < 1:
            raise SettingsError("network_rank", f"must be at least 1, got {self.rank}")
        if int(self.conv_rank) < 0:
            raise SettingsError("network_conv_rank", f"must be 0 (same as network_rank) or more, got {self.conv_rank}")
        for key, value in (("network_alpha", self.alpha), ("network_conv_alpha", self.conv_alpha)):
            if float(value) < 0:
                raise SettingsError(key, f"must be 0 or more, got {value}")
        element = self.element or "Full"
        if element not in ELEMENTS:
            raise SettingsError("network_element", f"unknown '{self.element}'; choose one of {', '.join(ELEMENTS)}")
        blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
        bad = [b for b in blocks if b not in BLOCK_IDS]
        if bad:
            raise SettingsError("network_blocks", f"unknown block IDs {bad}; use BASE, IN00..IN11, M00, OUT00..OUT11")
        object.__setattr__(self, "element", element)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "conv_rank", int(self.conv_rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "conv_alpha", float(self.conv_alpha))
        factor = int(self.factor)
        if factor == 0 or factor < -1:
            raise SettingsError("network_lokr_factor", f"must be -1 (most square split) or at least 1, got {self.factor}")
        object.__setattr__(self, "factor", factor)

    @classmethod
    def from_settings(cls, s: Any) -> NetworkSpec:
        """Read ``network_type``, ``network_rank``, ``network_alpha``, ``network_conv_rank``,
        ``network_conv_alpha``, ``network_blocks`` and ``network_element`` from a settings object."""
        return cls(
            network_type=s.network_type,
            rank=s.network_rank,
            alpha=s.network_alpha,
            conv_rank=getattr(s, "network_conv_rank", 0) or 0,
            conv_alpha=getattr(s, "network_conv_alpha", 0.0) or 0.0,
            blocks=tuple(getattr(s, "network_blocks", ALL)),
            element=getattr(s, "network_element", "Full") or "Full",
            factor=int(getattr(s, "network_lokr_factor", -1) or -1),
        )

    def rank_alpha(self, kind: str) -> tuple[int, float]:
        """Rank and alpha for a module kind (``linear``, ``conv1x1`` or ``conv``)."""
        if kind == "conv":
            return self.conv_rank or self.rank, self.conv_alpha or self.alpha
        return self.rank, self.alpha
