"""Delta formulas on bare tensors agree with running the factors as layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.network.functional import (
    apply_weight_delta,
    column_norm,
    dora_delta_weight,
    factorization,
    loha_delta_weight,
    lokr_delta_weight,
    lora_delta_weight,
)


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


@pytest.mark.parametrize(("dim", "factor", "expected"), [
    (320, -1, (16, 20)), (640, -1, (20, 32)), (768, -1, (24, 32)), (1280, -1, (32, 40)), (64, -1, (8, 8)),
    (13, -1, (1, 13)), (640, 8, (8, 80)), (640, 4, (4, 160)), (640, 7, (5, 128)), (12, 5, (3, 4)), (6, 4, (2, 3)),
])
def test_factorization_matches_lycoris_choices(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_lokr_delta_is_kronecker_product_in_both_layouts():
    w1, w2 = torch.randn(2, 3), torch.randn(4, 5)
    delta = lokr_delta_weight(w1, w2, 0.5, torch.Size([8, 15]))
    assert delta[4 + 1, 5 * 2 + 3] == pytest.approx(0.5 * float(w1[1, 2] * w2[1, 3]))
    # conv: a 4-D w2 (b, d, kh, kw) equals the flat (b, d·kh·kw) product reshaped, which loaders use
    w2c = torch.randn(4, 5, 3, 3)
    four = lokr_delta_weight(w1, w2c, 1.0, torch.Size([8, 15, 3, 3]))
    flat = torch.kron(w1, w2c.reshape(4, 45)).reshape(8, 15, 3, 3)
    torch.testing.assert_close(four, flat)
    assert four[5, 13, 2, 1] == pytest.approx(float(w1[1, 2] * w2c[1, 3, 2, 1]))


def test_dora_delta_renormalises_columns_and_zero_change_is_exact():
    base = torch.randn(6, 4, 3, 3)
    magnitude = column_norm(base)
    assert magnitude.shape == (1, 4, 1, 1)
    assert torch.count_nonzero(dora_delta_weight(base, torch.zeros_like(base), magnitude)) == 0
    delta = torch.randn_like(base)
    target = torch.rand(1, 4, 1, 1) + 0.5
    new = base + dora_delta_weight(base, delta, target)
    torch.testing.assert_close(column_norm(new), target)
    # direction is that of W + ΔW
    cos = torch.nn.functional.cosine_similarity(new.flatten(), (base + delta).flatten(), dim=0)
    assert cos > 0.99 or torch.allclose(column_norm(new), target)
    zero_col = base.clone()
    zero_col[:, 1] = 0
    assert torch.isfinite(dora_delta_weight(zero_col, torch.zeros_like(base), target)).all()
