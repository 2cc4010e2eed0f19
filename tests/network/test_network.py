"""Network: attach/detach over a tiny U-Net, context managers, groups, kohya state dicts, files."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import SettingsError
from trainer.network import (
    NetworkSpec,
    build_network,
    load_network_weights,
    network_from_file,
    save_lora,
)

TYPES = ["lierla", "c3lier", "loha", "lokr", "dora"]


@torch.no_grad()
def _randomize(network, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture
def run(unet_inputs):
    """``run(bundle) -> U-Net output`` on seeded inputs, without gradients."""

    @torch.no_grad()
    def _run(bundle, seed: int = 0) -> torch.Tensor:
        args, kwargs = unet_inputs(bundle, seed)
        return bundle.unet(*args, **kwargs).sample

    return _run


@pytest.fixture
def base_out(sd1_bundle, run):
    return run(sd1_bundle)


@pytest.mark.parametrize("network_type", TYPES)
def test_save_load_into_fresh_network_gives_same_output(run, sd1_bundle, base_out, tmp_path, network_type):
    spec = NetworkSpec(network_type, 4, 2, conv_rank=2, conv_alpha=1)
    net = build_network(sd1_bundle, spec)
    _randomize(net)
    path = save_lora(tmp_path / "a.safetensors", net.kohya_state_dict(torch.float32), {"ss_v2": "False"})
    net.attach()
    try:
        trained = run(sd1_bundle)
    finally:
        net.detach()
    assert not torch.allclose(trained, base_out)
    torch.manual_seed(99)
    fresh = build_network(sd1_bundle, spec)
    report = load_network_weights(fresh, path)
    assert len(report.matched) == len(fresh.adapters) and not (report.missing or report.unexpected or report.shape_mismatch)
    resumed = network_from_file(sd1_bundle, path)
    expected_conv = 0 if network_type in ("lierla", "dora") else 2  # attention-only types adapt no k×k conv
    assert resumed.spec.network_type == network_type
    if network_type != "lokr":  # a full LoKr w2 (rank ≥ half its size) carries no rank
        assert (resumed.spec.rank, resumed.spec.conv_rank) == (4, expected_conv)
    assert {type(a) for a in resumed.adapters.values()} == {type(a) for a in net.adapters.values()}
    assert set(resumed.adapters) == set(net.adapters)
    for other in (fresh, resumed):
        other.attach()
        try:
            torch.testing.assert_close(run(sd1_bundle), trained, atol=1e-5, rtol=1e-5)
        finally:
            other.detach()
    assert torch.equal(run(sd1_bundle), base_out)


def test_scaled_and_set_multiplier_restore(run, sd1_bundle, base_out):
    net = build_network(sd1_bundle, NetworkSpec("c3lier", 4, 4))
    _randomize(net)
    net.attach()
    try:
        full = run(sd1_bundle)
        with net.scaled(0.0):
            assert torch.equal(run(sd1_bundle), base_out)
        torch.testing.assert_close(run(sd1_bundle), full)
        net.set_multiplier(0.5)
        with pytest.raises(RuntimeError), net.scaled(2.0):
            raise RuntimeError("boom")
        assert {a.multiplier for a in net.adapters.values()} == {0.5}
    finally:
        net.detach()


def test_frozen_restores_requires_grad(sd1_bundle):
    net = build_network(sd1_bundle, NetworkSpec("lierla", 4, 4))
    first = next(net.parameters())
    first.requires_grad_(False)
    with net.frozen():
        assert not any(p.requires_grad for p in net.parameters())
    assert not first.requires_grad and sum(p.requires_grad for p in net.parameters()) == len(list(net.parameters())) - 1


def test_stacked_networks_detach_in_either_order(run, sd1_bundle, base_out):
    a = build_network(sd1_bundle, NetworkSpec("c3lier", 4, 4))
    b = build_network(sd1_bundle, NetworkSpec("lierla", 2, 1))
    _randomize(a, 1)
    _randomize(b, 2)
    for order in ((a, b), (b, a)):
        a.attach()
        a_only = run(sd1_bundle)
        b.attach()
        both = run(sd1_bundle)
        assert not torch.allclose(both, a_only)
        for net in order:
            net.detach()
        assert torch.equal(run(sd1_bundle), base_out)
        assert not any("forward" in m.__dict__ for m in sd1_bundle.unet.modules())
        assert not any("forward" in m.__dict__ for m in sd1_bundle.text_encoders["lora_te"].modules())


def test_training_gradients_reach_adapters_only(sd1_bundle, unet_inputs):
    net = build_network(sd1_bundle, NetworkSpec("c3lier", 4, 4))
    net.attach()
    try:
        args, kwargs = unet_inputs(sd1_bundle)
        sd1_bundle.unet.requires_grad_(False)
        sd1_bundle.unet(*args, **kwargs).sample.square().mean().backward()
    finally:
        net.detach()
    ups = [a.lora_up.weight.grad for a in net.adapters.values() if a.kohya_name.startswith("lora_unet")]
    assert all(g is not None for g in ups) and sum(float(g.abs().sum()) for g in ups) > 0


def test_param_groups_named_te_first(sd1_bundle):
    net = build_network(sd1_bundle, NetworkSpec("lierla", 4, 4))
    groups = net.param_groups(1e-4, 5e-5)
    assert [g["name"] for g in groups] == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert net.param_groups(1e-4, 0)[0]["lr"] == 1e-4
    unet_only = build_network(sd1_bundle, NetworkSpec("lierla", 4, 4, blocks=("M00",)))
    assert [g["name"] for g in unet_only.param_groups(1e-4, 1e-5)] == ["unet"]


def test_summary_and_state_dict_keys(sd1_bundle):
    net = build_network(sd1_bundle, NetworkSpec("c3lier", 4, 4))
    assert net.summary() == "U-Net 79 modules (48 linear, 31 conv), TE 12"
    sd = net.kohya_state_dict()
    assert len(sd) == 3 * 91 and all(v.dtype == torch.float16 for v in sd.values())
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in sd)


@pytest.mark.parametrize("network_type", [t for t in TYPES if t != "dora"])
def test_strength_scales_saved_delta(sd1_bundle, base_out, network_type):
    net = build_network(sd1_bundle, NetworkSpec(network_type, 4, 4, blocks=("M00",)))
    _randomize(net)
    scaled = build_network(sd1_bundle, NetworkSpec(network_type, 4, 4, blocks=("M00",)))
    scaled.load_kohya_state_dict(net.kohya_state_dict(torch.float32, strength=4.0))
    for name, adapter in net.adapters.items():
        torch.testing.assert_close(scaled.adapters[name].delta_weight(), 4 * adapter.delta_weight(), atol=1e-6, rtol=1e-4)
    alphas = {k: v for k, v in net.kohya_state_dict(torch.float32, strength=4.0).items() if k.endswith("alpha")}
    assert alphas and all(float(v) == 4.0 for v in alphas.values())  # alpha is never scaled


def test_dora_strength_is_refused_at_save(sd1_bundle):
    net = build_network(sd1_bundle, NetworkSpec("dora", 4, 4, blocks=("M00",)))
    assert net.kohya_state_dict(torch.float32, strength=1.0)
    with pytest.raises(SettingsError) as err:
        net.kohya_state_dict(torch.float32, strength=0.5)
    assert err.value.key == "network_strength"


def test_load_reports_mismatch_missing_unexpected(sd1_bundle):
    net = build_network(sd1_bundle, NetworkSpec("lierla", 4, 4, blocks=("M00",)))
    sd = net.kohya_state_dict(torch.float32)
    name = next(iter(net.adapters))
    sd[f"{name}.lora_down.weight"] = torch.zeros(8, *sd[f"{name}.lora_down.weight"].shape[1:])
    dropped = list(net.adapters)[1]
    del sd[f"{dropped}.lora_up.weight"]
    sd["lora_unet_conv_in.lora_up.weight"] = torch.zeros(1)
    report = net.load_kohya_state_dict(sd)
    assert report.unexpected == ("lora_unet_conv_in.lora_up.weight",)
    assert report.missing == (f"{dropped}.lora_up.weight",)
    assert len(report.shape_mismatch) == 1 and report.shape_mismatch[0].startswith(f"{name}.lora_down.weight")
    assert len(report.matched) == len(net.adapters) - 2


def test_other_layout_names_load(sd1_bundle):
    """A SD1 file written with sgm-layout U-Net names and TE names without text_model_ still loads."""
    net = build_network(sd1_bundle, NetworkSpec("c3lier", 4, 4))
    _randomize(net)
    renamed = {}
    for target in net.targets:
        for key, value in net.kohya_state_dict(torch.float32).items():
            if key.split(".", 1)[0] == target.kohya_name:
                renamed[f"{target.aliases[0]}.{key.split('.', 1)[1]}"] = value
    fresh = build_network(sd1_bundle, NetworkSpec("c3lier", 4, 4))
    report = fresh.load_kohya_state_dict(renamed)
    assert len(report.matched) == len(net.adapters) and not report.unexpected


def test_family_mismatch_names_both(sd1_bundle, sdxl_bundle, tmp_path):
    net = build_network(sdxl_bundle, NetworkSpec("lierla", 4, 4))
    path = save_lora(tmp_path / "xl.safetensors", net.kohya_state_dict(), {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SettingsError) as err:
        network_from_file(sd1_bundle, path)
    assert err.value.key == "network_resume" and "SDXL" in err.value.message and "SD1" in err.value.message
    bare = save_lora(tmp_path / "bare.safetensors", net.kohya_state_dict(), {})
    with pytest.raises(SettingsError):
        network_from_file(sd1_bundle, bare)  # lora_te1_ keys: SDXL even without metadata
    assert len(network_from_file(sdxl_bundle, bare).adapters) == len(net.adapters)


@pytest.mark.parametrize(("network_type", "suffixes", "count"), [
    ("lokr", {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}, 91),  # the c3lier modules
    ("dora", {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}, 60),  # the lierla modules
])
def test_lokr_and_dora_build_without_lycoris(sd1_bundle, network_type, suffixes, count, unet_inputs):
    net = build_network(sd1_bundle, NetworkSpec(network_type, 4, 2, conv_rank=2, conv_alpha=1))
    assert len(net.adapters) == count
    state = net.kohya_state_dict(torch.float32)
    assert {k.partition(".")[2] for k in state} == suffixes
    args, kwargs = unet_inputs(sd1_bundle)
    with torch.no_grad():
        base = sd1_bundle.unet(*args, **kwargs).sample
        net.attach()
        try:
            assert torch.equal(sd1_bundle.unet(*args, **kwargs).sample, base)  # fresh: exact no-op
        finally:
            net.detach()
