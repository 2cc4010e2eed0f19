"""Adapter properties, table-driven over algorithms × module kinds (style R25).

Covers lora.py, loha.py, lokr.py, dora.py, adapter.py and patching.py: zero multiplier is the base exactly, patched
forward equals merged weights, detach restores the original forward in any order, host class-level
patches installed after attach still run.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from trainer.errors import SettingsError
from trainer.network import DoRAModule, LoHaModule, LoKrModule, LoRAModule
from trainer.network.functional import column_norm
from trainer.network.patching import patches_of

ALGOS = {
    "lierla": LoRAModule,
    "c3lier": LoRAModule,
    "loha": LoHaModule,
    "lokr": LoKrModule,  # rank 4 on these small layers: full w2
    "lokr_split": functools.partial(LoKrModule, full_w2=False),  # w2 = w2_a @ w2_b
    "dora": DoRAModule,
}
KINDS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3_stride": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
}
CASES = [(a, k) for a in ALGOS for k in KINDS]


def _input(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(3, 12, generator=gen) if kind == "linear" else torch.randn(2, 6, 9, 9, generator=gen)


def _make(algo: str, kind: str, seed: int = 0, name: str = "lora_unet_x") -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    base = KINDS[kind]()
    adapter = ALGOS[algo](name, base, 4, 2.0)
    return base, adapter


@torch.no_grad()
def _randomize(adapter) -> None:
    gen = torch.Generator().manual_seed(11)
    for p in adapter.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize(("algo", "kind"), CASES)
def test_fresh_adapter_is_exact_noop(algo, kind):
    base, adapter = _make(algo, kind)
    x = _input(kind)
    expected = base(x)
    adapter.attach()
    assert torch.equal(base(x), expected)
    assert torch.count_nonzero(adapter.delta_weight()) == 0


@pytest.mark.parametrize(("algo", "kind"), CASES)
def test_multiplier_zero_is_base_exactly(algo, kind):
    base, adapter = _make(algo, kind)
    _randomize(adapter)
    x = _input(kind)
    expected = base(x)
    adapter.attach()
    assert not torch.allclose(base(x), expected)
    adapter.multiplier = 0.0
    assert torch.equal(base(x), expected)


@pytest.mark.parametrize(("algo", "kind"), CASES)
def test_patched_forward_equals_merged_weights(algo, kind):
    base, adapter = _make(algo, kind)
    _randomize(adapter)
    adapter.multiplier = 0.7
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight += 0.7 * adapter.delta_weight()
    adapter.attach()
    x = _input(kind)
    torch.testing.assert_close(base(x), merged(x), atol=1e-5, rtol=1e-5)
    # merge helper: merging then disabling the patch gives the same output, and -1 undoes it
    original = base.weight.clone()
    adapter.merge_into_base(1.0)
    adapter.multiplier = 0.0
    patched = base(x)
    torch.testing.assert_close(patched, merged(x), atol=1e-5, rtol=1e-5)
    adapter.multiplier = 0.7
    adapter.merge_into_base(-1.0)
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("algo", "kind"), CASES)
def test_state_roundtrip_gives_same_output(algo, kind):
    base, adapter = _make(algo, kind)
    _randomize(adapter)
    _, fresh = _make(algo, kind, seed=1)
    fresh.__dict__["base"] = base
    fresh.load_state_dict(adapter.state_dict())
    fresh.refresh_scale()
    x = _input(kind)
    torch.testing.assert_close(fresh.forward_delta(x), adapter.forward_delta(x))


@pytest.mark.parametrize(("algo", "kind"), CASES)
@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_two_stacked_adapters_detach_in_any_order(algo, kind, order):
    base, first = _make(algo, kind)
    second = ALGOS[algo]("lora_unet_y", base, 2, 1.0)
    _randomize(first)
    _randomize(second)
    sentinel = base.forward  # a bound method: no instance forward yet
    assert "forward" not in base.__dict__
    x = _input(kind)
    expected = base(x)
    first.attach()
    second.attach()
    both = expected + first.forward_delta(x) + second.forward_delta(x)
    torch.testing.assert_close(base(x), both, atol=1e-5, rtol=1e-5)
    assert patches_of(base) == (first, second)
    for adapter in ([second, first] if order == "lifo" else [first, second]):
        adapter.detach()
    assert "forward" not in base.__dict__ and base.forward == sentinel
    assert torch.equal(base(x), expected)


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_previous_instance_forward_is_preserved_and_restored(order):
    base, first = _make("lierla", "linear")
    second = LoRAModule("lora_unet_y", base, 2, 1.0)
    _randomize(first)
    calls = []

    def host_forward(x):
        calls.append(1)
        return type(base).forward(base, x) * 2

    base.forward = host_forward
    x = _input("linear")
    first.attach()
    second.attach()
    torch.testing.assert_close(base(x), 2 * nn.Linear.forward(base, x) + first.forward_delta(x))
    assert len(calls) == 1
    for adapter in ([second, first] if order == "lifo" else [first, second]):
        adapter.detach()
    assert base.__dict__["forward"] is host_forward


@pytest.mark.parametrize(("algo", "kind"), CASES)
def test_class_level_patch_after_attach_still_runs(algo, kind, monkeypatch):
    base, adapter = _make(algo, kind)
    _randomize(adapter)
    adapter.attach()
    cls = type(base)
    original = cls.forward
    calls = []

    def counting(self, x, *args, **kwargs):
        calls.append(self)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    x = _input(kind)
    out = base(x)
    assert calls == [base]  # our adapter uses F.* and never calls the class forward itself
    torch.testing.assert_close(out, original(base, x) + adapter.forward_delta(x))


@pytest.mark.parametrize("algo", list(ALGOS))
def test_adapter_runs_in_fp32_on_a_bf16_base(algo):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(torch.bfloat16)
    adapter = ALGOS[algo]("lora_unet_x", base, 4, 4.0)
    _randomize(adapter)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    adapter.attach()
    x = _input("linear").to(torch.bfloat16)
    out = base(x)
    assert out.dtype == torch.bfloat16
    expected = nn.Linear.forward(base, x).float() + adapter.forward_delta(x.float())
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.02)


def test_adapter_is_not_a_submodule_of_base_and_base_not_of_adapter():
    base, adapter = _make("lierla", "linear")
    adapter.attach()
    assert set(base.state_dict()) == {"weight", "bias"}
    assert set(adapter.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert list(base.children()) == []


@pytest.mark.parametrize(("kind", "down_shape", "up_shape"), [
    ("linear", (4, 12), (10, 4)), ("conv1x1", (4, 6, 1, 1), (8, 4, 1, 1)), ("conv3x3_stride", (4, 6, 3, 3), (8, 4, 1, 1)),
])
def test_lora_shapes_and_init(kind, down_shape, up_shape):
    _, adapter = _make("c3lier", kind)
    assert tuple(adapter.lora_down.weight.shape) == down_shape
    assert tuple(adapter.lora_up.weight.shape) == up_shape
    assert adapter.scale == 0.5 and float(adapter.alpha) == 2.0
    assert adapter.lora_down.weight.abs().sum() > 0 and adapter.lora_up.weight.abs().sum() == 0


def test_loha_shapes_and_zero_alpha_means_rank():
    base = nn.Conv2d(6, 8, 3, padding=1)
    adapter = LoHaModule("lora_unet_x", base, 4, 0)
    assert adapter.scale == 1.0
    assert tuple(adapter.hada_w1_a.shape) == (8, 4) and tuple(adapter.hada_w1_b.shape) == (4, 54)
    assert torch.count_nonzero(adapter.hada_w2_a) == 0


def test_detach_all_and_hand_removed_wrapper_recover():
    from trainer.network import detach_all

    root = nn.Sequential(nn.Linear(12, 10))
    base = root[0]
    first = LoRAModule("lora_unet_x", base, 4, 1.0)
    _randomize(first)
    first.attach()
    assert detach_all(root) == 1 and "forward" not in base.__dict__
    first.attach()  # detach_all cleared the attached flag, so this re-patches
    x = _input("linear")
    torch.testing.assert_close(base(x), nn.Linear.forward(base, x) + first.forward_delta(x))
    base.__dict__.pop("forward")  # a host deleting our wrapper by hand
    second = LoRAModule("lora_unet_y", base, 2, 1.0)
    _randomize(second)
    second.attach()
    torch.testing.assert_close(base(x), nn.Linear.forward(base, x) + second.forward_delta(x))


@pytest.mark.parametrize(("kind", "w1", "w2_keys", "scale"), [
    ("linear", (2, 3), {"lokr_w2": (5, 4)}, 1.0),
    ("conv1x1", (2, 2), {"lokr_w2": (4, 3, 1, 1)}, 1.0),
    ("conv3x3_stride", (2, 2), {"lokr_w2": (4, 3, 3, 3)}, 1.0),
])
def test_lokr_shapes_follow_lycoris_factorisation(kind, w1, w2_keys, scale):
    torch.manual_seed(0)
    adapter = LoKrModule("lora_unet_x", KINDS[kind](), 4, 2.0)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items() if k != "alpha"}
    assert shapes == {"lokr_w1": w1, **w2_keys}
    assert adapter.scale == scale  # a full w2 is applied unscaled by every loader


def test_lokr_split_w2_and_factor():
    base = nn.Linear(320, 640)
    adapter = LoKrModule("lora_unet_x", base, 4, 2.0)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    # 640 = 20·32 (most square), 320 = 16·20; rank 4 < max(32, 20) / 2 → w2 split, scale alpha / rank
    assert shapes == {"alpha": (), "lokr_w1": (20, 16), "lokr_w2_a": (32, 4), "lokr_w2_b": (4, 20)}
    assert adapter.scale == 0.5
    assert torch.count_nonzero(adapter.lokr_w2_b) == 0 and torch.count_nonzero(adapter.lokr_w1) > 0
    factored = LoKrModule("lora_unet_x", base, 4, 2.0, factor=8)
    assert tuple(factored.lokr_w1.shape) == (8, 8) and tuple(factored.lokr_w2_a.shape) == (80, 4)
    assert tuple(factored.lokr_w2_b.shape) == (4, 40)


@pytest.mark.parametrize("kind", list(KINDS))
def test_dora_magnitude_layout_and_renormalised_columns(kind):
    base, adapter = _make("dora", kind)
    in_dim = base.weight.shape[1]
    expected_shape = (1, in_dim) if kind == "linear" else (1, in_dim, 1, 1)
    assert tuple(adapter.dora_scale.shape) == expected_shape  # wd_on_output=False: what A1111 1.10 applies
    torch.testing.assert_close(adapter.dora_scale, column_norm(base.weight))
    _randomize(adapter)
    merged = base.weight + adapter.delta_weight()
    # every input column of the merged weight has exactly the learned magnitude
    torch.testing.assert_close(column_norm(merged), adapter.dora_scale.abs(), atol=1e-5, rtol=1e-5)


def test_dora_refuses_to_bake_a_strength():
    _, adapter = _make("dora", "linear")
    with pytest.raises(SettingsError) as err:
        adapter.scale_for_strength({}, 0.5)
    assert err.value.key == "network_strength"


@pytest.mark.parametrize("algo", ["lokr", "lokr_split", "loha", "c3lier"])
def test_strength_scaling_scales_delta(algo):
    base, adapter = _make(algo, "conv3x3_stride")
    _randomize(adapter)
    scaled = adapter.scale_for_strength({k: v.clone() for k, v in adapter.state_dict().items()}, 0.3)
    _, other = _make(algo, "conv3x3_stride", seed=1)
    other.__dict__["base"] = base
    other.load_state_dict(scaled)
    other.refresh_scale()
    torch.testing.assert_close(other.delta_weight(), 0.3 * adapter.delta_weight(), atol=1e-6, rtol=1e-5)
