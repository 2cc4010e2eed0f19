"""``network_strength`` is baked into saved files and taken back out when a file is loaded to train on."""

from __future__ import annotations

import pytest
import torch

from trainer.network import NetworkSpec, build_network, load_network_weights, network_from_file, save_lora


@pytest.mark.parametrize("network_type", ["lierla", "loha", "lokr"])
def test_loading_to_train_takes_the_saved_strength_out(sd1_bundle, tmp_path, network_type):
    torch.manual_seed(0)
    net = build_network(sd1_bundle, NetworkSpec(network_type, 4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    state = net.kohya_state_dict(torch.float32, strength=4.0)
    path = save_lora(tmp_path / "s4.safetensors", state, {"ss_v2": "False", "traintrain_network_strength": "4.0"})
    fresh = build_network(sd1_bundle, NetworkSpec(network_type, 4, 2))
    load_network_weights(fresh, path)  # network_resume: continues from the trained weights, not 4x them
    as_trained = network_from_file(sd1_bundle, path, trained=True)  # the Difference copier
    as_applied = network_from_file(sd1_bundle, path)  # what a Web-UI applies (check, effect)
    for name, adapter in net.adapters.items():
        want = adapter.delta_weight()
        assert torch.allclose(fresh.adapters[name].delta_weight(), want, atol=1e-6), name
        assert torch.allclose(as_trained.adapters[name].delta_weight(), want, atol=1e-6), name
        assert torch.allclose(as_applied.adapters[name].delta_weight(), 4 * want, atol=1e-6), name
