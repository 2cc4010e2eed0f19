"""Saved files load in diffusers (peft) with no unmatched key and give our in-process U-Net output."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.network import NetworkSpec, build_network, save_lora

peft = pytest.importorskip("peft")


@torch.no_grad()
def _randomize(network) -> None:
    gen = torch.Generator().manual_seed(4)
    for p in network.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _peft_layers(module: torch.nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("network_type", ["lierla", "c3lier"])
def test_sd1_file_loads_in_diffusers_with_same_output(sd1_bundle, tmp_path, network_type, unet_inputs):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    reference_unet = copy.deepcopy(sd1_bundle.unet)
    reference_te = copy.deepcopy(sd1_bundle.text_encoders["lora_te"])
    net = build_network(sd1_bundle, NetworkSpec(network_type, 4, 2, conv_rank=2, conv_alpha=1))
    _randomize(net)
    path = save_lora(tmp_path / "lora.safetensors", net.kohya_state_dict(torch.float32), {"ss_v2": "False"})

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    unet_keys = [k for k in state_dict if k.startswith("unet.")]
    te_keys = [k for k in state_dict if k.startswith("text_encoder.")]
    assert len(unet_keys) + len(te_keys) == len(state_dict)  # every key was converted
    reference_unet.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name="ours")
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state_dict, alphas, reference_te, prefix="text_encoder", adapter_name="ours"
    )
    num_unet = sum(t.component == "unet" for t in net.targets)
    assert _peft_layers(reference_unet) == num_unet and len(unet_keys) == 2 * num_unet
    assert _peft_layers(reference_te) == len(net.targets) - num_unet

    args, kwargs = unet_inputs(sd1_bundle)
    ids = torch.tensor([[0, 5, 17, 2]])
    net.attach()
    try:
        with torch.no_grad():
            ours = sd1_bundle.unet(*args, **kwargs).sample
            ours_te = sd1_bundle.text_encoders["lora_te"](ids).last_hidden_state
    finally:
        net.detach()
    with torch.no_grad():
        theirs = reference_unet(*args, **kwargs).sample
        theirs_te = reference_te(ids).last_hidden_state
        base = sd1_bundle.unet(*args, **kwargs).sample
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_te, ours_te, atol=1e-5, rtol=1e-5)


def test_sdxl_sgm_file_loads_in_diffusers_with_same_output(sdxl_bundle, tmp_path, unet_inputs):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    reference_unet = copy.deepcopy(sdxl_bundle.unet)
    net = build_network(sdxl_bundle, NetworkSpec("lierla", 4, 2))
    _randomize(net)
    path = save_lora(tmp_path / "xl.safetensors", net.kohya_state_dict(torch.float32), {})
    state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        str(path), unet_config=reference_unet.config
    )
    reference_unet.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name="ours")
    assert _peft_layers(reference_unet) == sum(t.component == "unet" for t in net.targets)
    args, kwargs = unet_inputs(sdxl_bundle)
    net.attach()
    try:
        with torch.no_grad():
            ours = sdxl_bundle.unet(*args, **kwargs).sample
    finally:
        net.detach()
    with torch.no_grad():
        theirs = reference_unet(*args, **kwargs).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
