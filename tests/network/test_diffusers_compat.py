"""Saved lierla/c3lier files load in diffusers (peft) with no unmatched key and give our in-process
U-Net and text-encoder outputs. Matrix: SD1 (diffusers names), SD2 (Linear proj_in/out, diffusers
names), SDXL (sgm names, renumbered by diffusers from the U-Net config) × lierla, c3lier."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.network import NetworkSpec, build_network, save_lora

peft = pytest.importorskip("peft")

# kohya TE prefix -> diffusers text-encoder prefix
_TE_PREFIX = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


@torch.no_grad()
def _randomize(network) -> None:
    gen = torch.Generator().manual_seed(4)
    for p in network.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _peft_layers(module: torch.nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("network_type", ["lierla", "c3lier"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_file_loads_in_diffusers_with_same_output(request, tmp_path, family, network_type, unet_inputs):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    bundle = request.getfixturevalue(f"{family}_bundle")
    mixin = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    reference_unet = copy.deepcopy(bundle.unet)
    reference_tes = {prefix: copy.deepcopy(te) for prefix, te in bundle.text_encoders.items()}
    net = build_network(bundle, NetworkSpec(network_type, 4, 2, conv_rank=2, conv_alpha=1))
    _randomize(net)
    path = save_lora(tmp_path / "lora.safetensors", net.kohya_state_dict(torch.float32), {})
    if any(t.component == "unet" and "input_blocks" in t.kohya_name for t in net.targets):
        assert family == "sdxl"  # only SDXL is saved in sgm names

    kwargs = {"unet_config": reference_unet.config} if family == "sdxl" else {}
    # folder + weight_name: diffusers < 0.38 refuses a bare file path when offline (Forge Neo ships 0.37.1)
    state_dict, alphas = mixin.lora_state_dict(str(path.parent), weight_name=path.name, **kwargs)
    unet_keys = [k for k in state_dict if k.startswith("unet.")]
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in state_dict)  # all converted
    reference_unet.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name="ours")
    for prefix, te in reference_tes.items():
        mixin.load_lora_into_text_encoder(state_dict, alphas, te, prefix=_TE_PREFIX[prefix], adapter_name="ours")
    num_unet = sum(t.component == "unet" for t in net.targets)
    assert _peft_layers(reference_unet) == num_unet and len(unet_keys) == 2 * num_unet
    for prefix, te in reference_tes.items():
        assert _peft_layers(te) == sum(t.component == prefix for t in net.targets) > 0

    args, kw = unet_inputs(bundle)
    ids = torch.tensor([[0, 5, 17, 2]])
    net.attach()
    try:
        with torch.no_grad():
            ours = bundle.unet(*args, **kw).sample
            ours_te = {p: te(ids).last_hidden_state for p, te in bundle.text_encoders.items()}
    finally:
        net.detach()
    with torch.no_grad():
        theirs = reference_unet(*args, **kw).sample
        theirs_te = {p: te(ids).last_hidden_state for p, te in reference_tes.items()}
        base = bundle.unet(*args, **kw).sample
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    for prefix in ours_te:
        torch.testing.assert_close(theirs_te[prefix], ours_te[prefix], atol=1e-5, rtol=1e-5)
