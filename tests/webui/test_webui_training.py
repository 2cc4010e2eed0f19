"""Training through the Web-UI runtime: a network attached to the in-place model learns, saves under
kohya names (SD1 U-Net in diffusers layout, SDXL in sgm layout, TE with text_model_) and the host comes
back bit-exact."""

from __future__ import annotations

import pytest
import torch

network = pytest.importorskip("trainer.network")
if not hasattr(network, "build_network"):
    pytest.skip("trainer.network has no build_network yet", allow_module_level=True)

from helpers import fingerprint  # noqa: E402

from trainer.hosts.webui import WebUIHost  # noqa: E402


def train(bundle, blocks, steps=3):
    spec = network.NetworkSpec("c3lier", rank=4, alpha=2.0, blocks=blocks)
    net = network.build_network(bundle, spec)
    net.attach()
    for adapter in net.adapters.values():  # up weights start at zero: give them a start so all grads flow
        for name, p in adapter.named_parameters():
            if "up" in name:
                torch.nn.init.normal_(p, std=1e-3)
    opt = torch.optim.AdamW([p for g in net.param_groups(1e-2) for p in g["params"]], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    latents = bundle.encode_images(torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1, gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([200, 600])
    a = bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    losses = []
    for _ in range(steps):
        cond = bundle.encode_prompts(["a photo", "red"])  # re-encoded: TE adapters train on SD1
        loss = torch.nn.functional.mse_loss(bundle.predict(noisy, t, cond), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, losses


TE_LEAVES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def te_names(keys, prefix: str) -> set[str]:
    return {k.split(".")[0] for k in keys if k.startswith(prefix + "_text_model_encoder_layers_")}


def expected_te(prefix: str, layers: int) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{i}_{leaf}" for i in range(layers) for leaf in TE_LEAVES}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_train_save_keys_and_restore(webui, models, family):
    from modules import sd_models

    if family == "sdxl":
        sd_models.reload_model_weights(info=sd_models.checkpoints_list["xl.safetensors [def]"])
    elif family == "sd2":
        webui.sd_model = models.LatentDiffusionSD2(seed=3)
    model = webui.sd_model
    before = fingerprint(model)
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        bundle.set_gradient_checkpointing(True)
        blocks = tuple(network.BLOCK_IDS)
        net, losses = train(bundle, blocks)
        keys = set(net.kohya_state_dict())
        grads = {a.kohya_name: a.lora_down.weight.grad for a in net.adapters.values() if a.kohya_name.startswith("lora_te")}
        te_grads = {n: 0.0 if g is None else float(g.abs().sum()) for n, g in grads.items()}
        with torch.no_grad(), net.scaled(0.0):
            cond = bundle.encode_prompts(["x"])
            base_out = bundle.predict(torch.ones(1, 4, 8, 8), torch.tensor([300]), cond)
        # leave the network attached: the host must clean up after an abandoned run too
    assert losses[-1] < losses[0], losses
    unet = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    if family == "sd1":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
        assert "lora_unet_up_blocks_1_resnets_0_conv1" in unet
        assert te_names(keys, "lora_te") == expected_te("lora_te", 2)
    elif family == "sd2":  # OpenCLIP, 3 blocks, the last never runs (penultimate layer): not adapted
        assert te_names(keys, "lora_te") == expected_te("lora_te", 2)
    else:
        assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in unet
        assert "lora_unet_output_blocks_3_0_in_layers_2" in unet
        assert te_names(keys, "lora_te1") == expected_te("lora_te1", 2)  # CLIP-L (transformers)
        assert te_names(keys, "lora_te2") == expected_te("lora_te2", 2)  # OpenCLIP, fused q/k/v
    # every text-encoder adapter was reached by the loss (sgm's no_grad lifted, q/k/v views wired)
    assert te_grads and all(g > 0 for g in te_grads.values()), [n for n, g in te_grads.items() if g == 0]
    assert fingerprint(model) == before
    with torch.no_grad():
        restored = predict_with_fresh_bundle(model, cond)
    assert torch.equal(restored, base_out)


def predict_with_fresh_bundle(model, cond):
    from trainer.models.webui_runtime import WebUIBundle

    return WebUIBundle(model, device=torch.device("cpu")).predict(torch.ones(1, 4, 8, 8), torch.tensor([300]), cond)
