"""The Web-UI runtime (A1111 ldm/sgm in place) against tiny fakes whose U-Net really computes."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import SettingsError
from trainer.models.bundle import Cond, Family, ModelBundle, UNetShape
from trainer.models.webui_runtime import TE_NOTE_MEDVRAM, WebUIBundle, check_text_encoder_training


@pytest.fixture(scope="module")
def sd1(models):
    return models.LatentDiffusion(seed=1)


@pytest.fixture(scope="module")
def sdxl(models):
    return models.DiffusionEngine(seed=2)


def test_sd1_bundle_attributes(sd1):
    b = WebUIBundle(sd1, device=torch.device("cpu"))
    assert isinstance(b, ModelBundle)
    assert (b.family, b.layout, b.v_pred, b.dtype) == (Family.SD1, "ldm", False, torch.float32)
    assert b.unet is sd1.model.diffusion_model
    assert b.unet_shape == UNetShape(layers_per_block=1, up_has_attention=(False, True))
    assert list(b.text_encoders) == ["lora_te"]
    assert type(b.text_encoders["lora_te"]).__name__ == "CLIPTextModel"
    assert b.alphas_cumprod.shape == (1000,) and b.alphas_cumprod.dtype == torch.float32


def test_alphas_from_original_and_v_from_parameterization(models):
    m = models.LatentDiffusion(seed=1, parameterization="v")
    original = m.alphas_cumprod_original.clone()
    m.alphas_cumprod = m.alphas_cumprod.half().float() * 0.5  # what a generation may leave behind
    b = WebUIBundle(m, device=torch.device("cpu"))
    assert b.v_pred is True
    assert torch.equal(b.alphas_cumprod, original)
    assert WebUIBundle(m, device=torch.device("cpu"), v_pred=False).v_pred is False


def test_sd1_encode_and_predict_match_diffusers(sd1):
    b = WebUIBundle(sd1, device=torch.device("cpu"))
    cond = b.encode_prompts(["a photo", "red"])
    assert cond.context.shape == (2, 77, 32) and cond.pooled is None
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rng = torch.get_rng_state()
    z1 = b.encode_images(pixels, torch.Generator().manual_seed(5))
    z2 = b.encode_images(pixels, torch.Generator().manual_seed(5))
    z3 = b.encode_images(pixels, torch.Generator().manual_seed(6))
    assert torch.equal(rng, torch.get_rng_state()), "encode_images touched the global RNG"
    assert z1.shape == (2, 4, 8, 8) and z1.dtype == torch.float32
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    out = b.predict(noisy, t, cond)
    ref = b.unet.diffusers_unet(noisy, t, cond.context).sample
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out, ref)


def test_sdxl_bundle_and_size_conditioning(sdxl):
    b = WebUIBundle(sdxl, device=torch.device("cpu"), medvram=True)  # medvram: encoders left alone
    assert b.family is Family.SDXL and b.text_encoders == {} and b.text_encoder_note == TE_NOTE_MEDVRAM
    assert (b.pooled_dim, b.size_dim) == (48, 8)
    cond = b.encode_prompts(["a photo", "red"])
    vector = sdxl.get_learned_conditioning(["a photo", "red"])["vector"]
    assert cond.context.shape == (2, 77, 80)
    assert torch.equal(cond.pooled, vector[:, :48])
    z = b.encode_images(torch.zeros(1, 3, 64, 128), torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 16)
    for h, w in ((8, 8), (8, 16)):  # square and landscape latents: the pixel size is what counts
        noisy, t = torch.randn(2, 4, h, w), torch.tensor([3, 900])
        out = b.predict(noisy, t, cond)
        ids = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * 2)
        ref = b.unet.diffusers_unet(noisy, t, cond.context, added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (h, w, (out - ref).abs().max())  # two size-embedding codes: rounding may differ per CPU
    wrong = b.unet.diffusers_unet(noisy, t, cond.context, added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids // 8}).sample
    assert not torch.allclose(out, wrong, atol=1e-4)


def test_sdxl_per_sample_original_size_and_crop_reach_the_unet(sdxl):
    b = WebUIBundle(sdxl, device=torch.device("cpu"), medvram=True)
    cond = b.encode_prompts(["a photo", "red"])
    sizes = torch.tensor([[61.0, 151, 0, 7, 64, 128], [900, 700, 24, 0, 64, 128]])  # bucket 128x64, cropped
    noisy, t = torch.randn(2, 4, 8, 16), torch.tensor([3, 900])
    out = b.predict(noisy, t, cond.with_size(sizes))
    ref = b.unet.diffusers_unet(noisy, t, cond.context, added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": sizes}).sample
    assert torch.allclose(out, ref, atol=1e-6, rtol=0), (out - ref).abs().max()
    uncropped = b.predict(noisy, t, cond)  # original = target, crop 0: what every sample got before
    assert (out - uncropped).abs().max() > 1e-4


def test_base_refused_where_text_encoder_cannot_train(sdxl, sd1):
    with pytest.raises(SettingsError, match="medvram"):
        check_text_encoder_training(WebUIBundle(sdxl, device=torch.device("cpu"), medvram=True), ["BASE", "IN01"])
    check_text_encoder_training(WebUIBundle(sd1, device=torch.device("cpu")), ["BASE"])


def test_gradient_checkpointing_same_grads_and_removable(sd1):
    b = WebUIBundle(sd1, device=torch.device("cpu"))
    for p in sd1.parameters():
        p.requires_grad_(False)
    target = b.unet.middle_block[1].transformer_blocks[0].attn2.to_v  # attention-only adapter: the reentrant trap
    extra = torch.nn.Parameter(torch.zeros(target.out_features, target.in_features))
    target.forward = lambda x: torch.nn.functional.linear(x, target.weight + extra, target.bias)
    cond = b.encode_prompts(["a photo", "red"])
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([100, 400])
    grads = []
    try:
        for enabled in (False, True):
            b.set_gradient_checkpointing(enabled)
            extra.grad = None
            b.predict(noisy, t, cond).square().mean().backward()
            grads.append(extra.grad.clone())
        n_wrapped = sum("forward" in m.__dict__ for m in b.unet.modules()) - 1
        assert n_wrapped == sum(type(m).__name__ in ("SpatialTransformer", "ResBlock") for m in b.unet.modules()) > 0
    finally:
        b.set_gradient_checkpointing(False)
        del target.__dict__["forward"]
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    assert sum("forward" in m.__dict__ for m in b.unet.modules()) == 0
    for p in sd1.parameters():
        p.requires_grad_(True)


def test_cond_helpers_roundtrip(sd1):
    c = WebUIBundle(sd1, device=torch.device("cpu")).encode_prompts(["x", "y"])
    assert isinstance(c, Cond) and c.repeat(2).batch_size == 4
