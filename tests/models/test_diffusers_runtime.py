"""DiffusersBundle: prompt encoding as inference does, image encoding, SDXL pixel time_ids, freezing."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import MissingPackage
from trainer.models.bundle import Family, ModelBundle
from trainer.models.diffusers_runtime import load_bundle


@pytest.fixture(scope="module")
def sd1():
    return load_bundle("tiny-sd1", device="cpu")


@pytest.fixture(scope="module")
def sd2v():
    return load_bundle("tiny-sd2v", device="cpu")


@pytest.fixture(scope="module")
def sdxl():
    return load_bundle("tiny-sdxl", device="cpu")


def test_protocol_and_frozen(sd1, sdxl) -> None:
    for bundle in (sd1, sdxl):
        assert isinstance(bundle, ModelBundle)
        assert bundle.layout == "diffusers" and bundle.vae_scale_factor == 8
        modules = (bundle.unet, bundle.vae, *bundle.text_encoders.values())
        assert not any(p.requires_grad for m in modules for p in m.parameters())
        assert not any(m.training for m in modules)
    assert list(sd1.text_encoders) == ["lora_te"]
    assert list(sdxl.text_encoders) == ["lora_te1", "lora_te2"]
    assert sd1.unet_shape.layers_per_block == 1 and sd1.unet_shape.up_has_attention == (False, True)


def test_alphas_cumprod_matches_diffusers(sd1) -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert sd1.alphas_cumprod.dtype == torch.float32 and sd1.alphas_cumprod.shape == (1000,)
    assert torch.equal(sd1.alphas_cumprod, ref)


def test_sd1_and_sd2_use_last_layer_with_final_norm(sd1, sd2v) -> None:
    for bundle in (sd1, sd2v):
        tok = bundle.tokenizers[0]
        ids = tok(["a cat"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = bundle.text_encoders["lora_te"](ids).last_hidden_state
            got = bundle.encode_prompts(["a cat"])
        assert got.pooled is None
        assert torch.equal(got.context, expected)
    assert sd2v.tokenizers[0].pad_token_id == 0 and sd1.tokenizers[0].pad_token_id != 0


def test_sdxl_penultimate_layers_and_pooled(sdxl) -> None:
    te1, te2 = sdxl.text_encoders.values()
    tok1, tok2 = sdxl.tokenizers
    ids1 = tok1(["a cat"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    ids2 = tok2(["a cat"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out2 = te2(ids2, output_hidden_states=True)
        expected = torch.cat([te1(ids1, output_hidden_states=True).hidden_states[-2], out2.hidden_states[-2]], -1)
        got = sdxl.encode_prompts(["a cat"])
    assert torch.equal(got.context, expected)
    assert torch.equal(got.pooled, out2.text_embeds)
    assert got.context.shape == (1, 77, 80) and got.pooled.shape == (1, 48)


def test_long_prompt_chunks(sd1, sdxl) -> None:
    long_prompt = " ".join(["cat"] * 100)
    assert len(sd1.tokenizers[0](long_prompt, add_special_tokens=False)["input_ids"]) == 100
    with torch.no_grad():
        cond = sd1.encode_prompts([long_prompt, "a dog"])
        empty = sd1.encode_prompts([""]).context
        dog = sd1.encode_prompts(["a dog"]).context
        xl = sdxl.encode_prompts([long_prompt])
    assert cond.context.shape == (2, 154, 32)
    # a batch of 4 chunks and a batch of 1 may take different matmul kernels: equal to rounding, not bits
    torch.testing.assert_close(cond.context[1, :77], dog[0], atol=1e-5, rtol=1e-5)    # short row: its own chunk ...
    torch.testing.assert_close(cond.context[1, 77:], empty[0], atol=1e-5, rtol=1e-5)  # ... then an empty chunk
    assert (cond.context[1, 77:] - dog[0]).abs().max() > 1e-2  # the two chunks are told apart by far more
    assert xl.context.shape == (1, 154, 80) and xl.pooled.shape == (1, 48)
    ids = sd1._chunk_ids(sd1.tokenizers[0], [long_prompt])[0]
    bos, eos = sd1.tokenizers[0].bos_token_id, sd1.tokenizers[0].eos_token_id
    assert ids[0] == ids[77] == bos and ids[76] == eos and ids[77 + 26] == eos  # 75 + 25 tokens


def test_encode_images_sampled_with_generator(sd1) -> None:
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    a = sd1.encode_images(pixels, torch.Generator().manual_seed(7))
    b = sd1.encode_images(pixels, torch.Generator().manual_seed(7))
    c = sd1.encode_images(pixels, torch.Generator().manual_seed(8))
    with torch.no_grad():
        dist = sd1.vae.encode(pixels).latent_dist
    expected = dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    assert a.dtype == torch.float32 and a.shape == (2, 4, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, expected)


def test_sdxl_time_ids_are_pixel_sizes(sdxl) -> None:
    seen = []
    hook = sdxl.unet.add_time_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        cond = sdxl.encode_prompts(["a cat", "a dog"])
        with torch.no_grad():
            sdxl.predict(torch.randn(2, 4, 8, 12), torch.tensor([1, 2]), cond)
    finally:
        hook.remove()
    assert seen[0].tolist() == [64.0, 96.0, 0.0, 0.0, 64.0, 96.0] * 2


def test_predict_families(sd1, sd2v, sdxl) -> None:
    for bundle in (sd1, sd2v, sdxl):
        cond = bundle.encode_prompts(["a", "b"])
        with torch.no_grad():
            out = bundle.predict(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), cond)
        assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    assert (sd1.family, sd2v.family, sdxl.family) == (Family.SD1, Family.SD2, Family.SDXL)
    assert sd2v.v_pred and not sd1.v_pred


def test_gradient_checkpointing_keeps_gradients(sd1, monkeypatch) -> None:
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", spy)
    weight = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    cond = sd1.encode_prompts(["a cat"])
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    weight.requires_grad_(True)
    try:
        for enabled in (False, True):
            sd1.set_gradient_checkpointing(enabled)
            sd1.predict(noisy, torch.tensor([500]), cond).square().mean().backward()
            grads.append(weight.grad.clone())
            weight.grad = None
        assert sd1.unet.is_gradient_checkpointing
    finally:
        sd1.set_gradient_checkpointing(False)
        weight.requires_grad_(False)
    assert calls and set(calls) == {False}  # blocks were checkpointed, non-reentrant
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_offload(sd1) -> None:
    sd1.offload("vae", "text_encoders")
    assert next(sd1.vae.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="unknown part"):
        sd1.offload("unet")


def test_int8_needs_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(MissingPackage, match="torchao"):
            load_bundle("tiny-sd1", device="cpu", dtype=torch.int8)
    else:
        pytest.skip("torchao is installed")
