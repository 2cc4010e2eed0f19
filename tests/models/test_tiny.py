"""Built-in models: seeded, small, and leaving the caller's RNG alone."""

from __future__ import annotations

import pytest
import torch

from trainer.models.bundle import Family
from trainer.models.tiny import build_builtin

TINY = {"tiny-sd1": Family.SD1, "tiny-sd2v": Family.SD2, "tiny-sdxl": Family.SDXL}


def _params(parts) -> dict[str, torch.Tensor]:
    out = {}
    for label, module in (("unet", parts.unet), ("vae", parts.vae), *((f"te{i}", t) for i, t in enumerate(parts.text_encoders))):
        out.update({f"{label}.{k}": v for k, v in module.state_dict().items()})
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_is_deterministic_small_and_rng_neutral(name: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_builtin(name)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    second = build_builtin(name)
    a, b = _params(first), _params(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    count = sum(p.numel() for m in (first.unet, first.vae, *first.text_encoders) for p in m.parameters())
    assert count < 2_000_000
    assert first.family is TINY[name]
    assert first.v_pred is (name == "tiny-sd2v")


def test_tiny_sdxl_encoders_differ_in_width() -> None:
    parts = build_builtin("tiny-sdxl")
    widths = [te.config.hidden_size for te in parts.text_encoders]
    assert widths == [32, 48]
    assert parts.unet.config.cross_attention_dim == 80
    assert parts.unet.config.addition_embed_type == "text_time"


def test_unknown_builtin() -> None:
    with pytest.raises(KeyError):
        build_builtin("tiny-sd3")
