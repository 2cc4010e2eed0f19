"""Delta formulas on bare tensors agree with running the factors as layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.network.functional import apply_weight_delta, loha_delta_weight, lora_delta_weight


def test_lora_linear_delta_is_scaled_product():
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    torch.testing.assert_close(lora_delta_weight(up, down, 0.5), 0.5 * up @ down)


def test_lora_conv_delta_equals_stacked_convolutions():
    up, down = torch.randn(6, 3, 1, 1), torch.randn(3, 4, 3, 3)
    x = torch.randn(2, 4, 9, 9)
    stacked = F.conv2d(F.conv2d(x, down, stride=2, padding=1), up) * 0.25
    merged = F.conv2d(x, lora_delta_weight(up, down, 0.25), stride=2, padding=1)
    torch.testing.assert_close(merged, stacked, atol=1e-5, rtol=1e-5)


def test_loha_delta_is_hadamard_of_products():
    w1a, w1b, w2a, w2b = torch.randn(6, 2), torch.randn(2, 36), torch.randn(6, 2), torch.randn(2, 36)
    delta = loha_delta_weight(w1a, w1b, w2a, w2b, 2.0, torch.Size([6, 4, 3, 3]))
    assert delta.shape == (6, 4, 3, 3)
    torch.testing.assert_close(delta.reshape(6, 36), 2.0 * (w1a @ w1b) * (w2a @ w2b))


def test_apply_weight_delta_uses_base_geometry():
    base = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    delta = torch.randn_like(base.weight)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(apply_weight_delta(base, x, delta), F.conv2d(x, delta, stride=2, padding=1))
