"""Z-Image and Anima trained in place inside Forge Neo, against a fake built from Neo's files
(``fake_neo_models.py``: engines, NextDiT / Cosmos transformers, text engines, VAE patcher, all built under
inference mode) and Neo's LoRA key map and merge (``fake_neo_lora.py``)."""

from __future__ import annotations

import logging

import fake_neo_lora
import pytest
import torch
from helpers import mode_inputs

from trainer.errors import TrainTrainError
from trainer.hosts.webui import WebUIHost
from trainer.network import NetworkSpec, build_network, load_lora
from trainer.progress import Events
from trainer.runner import run_job
from trainer.settings import Settings

BASE = {"image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32, "train_iterations": 3,
        "train_batch_size": 1, "train_seed": 0, "train_model_precision": "fp32", "save_precision": "fp32",
        "network_rank": 4, "network_alpha": 4, "logging_save_csv": False, "train_learning_rate": "1e-2",
        "train_snr_gamma": 0}
CHECKPOINTS = {"zimage": "z_image_turbo.safetensors [zi]", "anima": "anima.safetensors [an]"}


@pytest.fixture
def neo(forge):
    """Forge Neo with a Z-Image and an Anima checkpoint listed (nothing loaded until a job or generation)."""
    import fake_neo_models
    from modules import sd_models

    for key, make in (("zimage", fake_neo_models.neo_zimage), ("anima", fake_neo_models.neo_anima)):
        title = CHECKPOINTS[key]
        sd_models.checkpoints_list[title] = sd_models.CheckpointInfo(title, f"/m/{title.split()[0]}", title.split(".")[0], make)
    return forge


def _load(shared, family: str):
    from modules import sd_models

    sd_models.select(CHECKPOINTS[family])
    sd_models.forge_model_reload()
    return shared.sd_model


def _latent(family: str, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x.unsqueeze(2) if family == "anima" else x


def _generate(engine, family: str, prompt: str = "a photo") -> torch.Tensor:
    """A denoised prediction exactly as Neo's generation computes it (inference mode, ``apply_model``)."""
    return engine.generate(_latent(family), torch.tensor([0.6]), [prompt])


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_the_fake_fails_as_neo_does_without_our_handling(neo, family):
    engine = _load(neo, family)
    model = engine.forge_objects.unet.model.diffusion_model
    assert all(p.is_inference() and not p.requires_grad for p in model.parameters())
    context = torch.stack([c.reshape(-1, c.shape[-1]) for c in engine.get_learned_conditioning(["a"])])
    extra = torch.zeros(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        model(_latent(family) + extra, torch.tensor([0.5]), context=context.clone()).sum().backward()


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_the_bundle_predicts_what_neo_generates(neo, family):
    """predict is Neo's own denoiser call: x − σ·predict equals Neo's denoised output, prompts of different
    lengths batched together give each prompt's own prediction, latents are Neo's (latent format applied)."""
    engine = _load(neo, family)
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        assert type(bundle).__name__ == "NeoDiTBundle" and bundle.flow.shift == 3.0
        x = _latent(family).reshape(1, 16, 8, 8)
        sigma = torch.tensor([0.6])
        with torch.no_grad():
            ours = x - sigma * bundle.predict(x, sigma, bundle.encode_prompts(["a photo"]))
            batch = bundle.predict(torch.cat([x, x]), torch.tensor([0.6, 0.6]), bundle.encode_prompts(["a photo", "red"]))
            alone = bundle.predict(x, sigma, bundle.encode_prompts(["red"]))
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latents = bundle.encode_images(pixels)
    torch.testing.assert_close(ours, _generate(engine, family).reshape(1, 16, 8, 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1:], alone, rtol=1e-4, atol=1e-5)
    assert (batch[0] - batch[1]).abs().mean() > 0.01 * batch.abs().mean()  # the prompt matters
    with torch.inference_mode():
        neo_latents = engine.encode_first_stage(pixels)
    torch.testing.assert_close(latents, neo_latents.reshape(1, 16, 8, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_every_mode_trains_and_generation_is_unchanged_after(neo, family, mode, tmp_path, caplog):
    engine = _load(neo, family)
    before = _generate(engine, family)
    model = engine.forge_objects.unet.model.diffusion_model
    text_flags = [(p.is_inference(), p.requires_grad) for p in engine.cond_stage_model.parameters()]
    settings = Settings.from_layers(BASE, {"mode": mode, "save_lora_name": f"n_{family}_{mode}"}, mode_inputs(mode, tmp_path))
    with caplog.at_level(logging.WARNING, logger="traintrain"):
        result = run_job(settings, WebUIHost(), events=Events())
    assert result["status"] == "done" and result["steps"] == 3
    state, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == family
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and max(float(v.abs().max()) for v in ups) > 0  # gradients reached the adapters
    assert neo.sd_model is engine
    assert torch.equal(_generate(engine, family), before)  # the no-LoRA generation is bit-identical
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]  # qkv slices, checkpointing undone
    assert [(p.is_inference(), p.requires_grad) for p in engine.cond_stage_model.parameters()] == text_flags
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage() or "instance forwards" in r.getMessage()]


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_neos_loader_applies_every_key_and_generates_what_we_trained(neo, family, tmp_path):
    """Neo's key map matches 100% of the saved keys (Z-Image's q/k/v into slices of the fused qkv), and
    Neo's merge of the file gives the prediction the adapters gave in place."""
    engine = _load(neo, family)
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": f"k_{family}", "train_iterations": 4},
                                    mode_inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    state, _ = load_lora(result["lora_path"])
    kmodel = engine.forge_objects.unet.model
    patches, unmatched = fake_neo_lora.load_lora(state, fake_neo_lora.model_lora_keys_unet(kmodel))
    # every attention/MLP Linear of the transformer (Neo's Linear class is not an nn.Linear): Z-Image 7 per block
    # × (2 layers + 2 refiners), Anima 10 per block × 2
    assert unmatched == {} and len(patches) == len(state) // 3 == {"zimage": 28, "anima": 20}[family]
    if family == "zimage":
        assert sum(isinstance(t, tuple) for t in patches) == 3 * 4  # q, k, v of 4 fused qkv (2 layers + 2 refiners)
    plain = _generate(engine, family)
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        network = build_network(bundle, NetworkSpec(network_type="lierla", rank=4, alpha=4))
        assert network.load_kohya_state_dict(state).unexpected == ()
        network.attach()
        try:
            with torch.no_grad():
                x, sigma = _latent(family).reshape(1, 16, 8, 8), torch.tensor([0.6])
                in_place = x - sigma * bundle.predict(x, sigma, bundle.encode_prompts(["a photo"]))
        finally:
            network.detach()
    backup = fake_neo_lora.apply(kmodel, patches)
    try:
        merged = _generate(engine, family).reshape(1, 16, 8, 8)
    finally:
        fake_neo_lora.restore(kmodel, backup)
    assert (merged - plain.reshape(1, 16, 8, 8)).abs().max() > 1e-3  # the LoRA changes the image
    torch.testing.assert_close(merged, in_place, rtol=1e-4, atol=1e-4)
    assert torch.equal(_generate(engine, family), plain)


def test_a_flow_family_we_do_not_train_is_one_line_and_untouched(neo):
    """Neo also loads Flux, Chroma, Qwen-Image…: refused before anything is copied or patched."""
    engine = _load(neo, "zimage")
    engine.__class__ = type("Flux", (type(engine),), {})
    model = engine.forge_objects.unet.model.diffusion_model
    with pytest.raises(TrainTrainError, match="Flux.*next release"):
        with WebUIHost().acquire("", "", precision="fp32", v_pred=None):
            pass
    assert all(p.is_inference() for p in model.parameters())  # nothing was copied


def test_a_partly_loaded_model_is_refused(neo):
    """Neo streams part of a model from RAM when VRAM is short; training needs every weight on its device."""
    from trainer.models.webui_dit import NeoDiTBundle

    engine = _load(neo, "zimage")
    with pytest.raises(TrainTrainError, match="keeps .* weights off meta"):
        NeoDiTBundle(engine, device=torch.device("meta"))
    assert not [n for n, m in engine.forge_objects.unet.model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_gradient_checkpointing_is_exact(neo, family):
    _load(neo, family)
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        cond = bundle.encode_prompts(["a", "bb"])
        z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        network = build_network(bundle, NetworkSpec(network_type="lierla", rank=2, alpha=2))
        network.attach()
        torch.nn.init.normal_(next(iter(network.adapters.values())).lora_up.weight)

        def grads(checkpointing: bool) -> torch.Tensor:
            bundle.set_gradient_checkpointing(checkpointing)
            network.zero_grad()
            bundle.predict(z, torch.tensor([0.3, 0.8]), cond).square().mean().backward()
            return torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])

        plain, checkpointed = grads(False), grads(True)
        assert len(bundle._checkpointed) == {"zimage": 4, "anima": 2}[family]
        bundle.set_gradient_checkpointing(False)
        network.detach()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_previews_render_in_neo(neo, family, tmp_path):
    """Slider-mode previews (−1/0/+1) through the flow Euler sampler over the in-place transformer."""
    _load(neo, family)
    settings = Settings.from_layers(BASE, {"mode": "iLECO", "save_lora_name": f"pv_{family}", "sample_every_n_steps": 3,
                                           "sample_prompts": "a photo --w 64 --h 64 --s 2"}, mode_inputs("iLECO", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events(), logs_root=tmp_path / "logs")
    assert result["status"] == "done"
    from PIL import Image

    pngs = sorted((tmp_path / "logs").rglob("*.png"))
    assert pngs and Image.open(pngs[0]).size[1] == 64


def test_the_model_is_restored_after_an_error(neo, tmp_path, monkeypatch):
    from trainer.models import webui_dit

    engine = _load(neo, "zimage")
    before = _generate(engine, "zimage")
    model = engine.forge_objects.unet.model.diffusion_model
    calls = []

    def boom(self, *args, **kwargs):
        calls.append([n for n, m in model.named_modules() if "forward" in m.__dict__])  # qkv routed through slices
        raise RuntimeError("boom")

    monkeypatch.setattr(webui_dit.NeoDiTBundle, "predict", boom)
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "err", "use_gradient_checkpointing": True},
                                    mode_inputs("LoRA", tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        run_job(settings, WebUIHost(), events=Events())
    assert len(calls[0]) >= 4  # the error came while the model was patched
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert not list((tmp_path / "Lora").glob("err*"))
    monkeypatch.undo()
    assert torch.equal(_generate(engine, "zimage"), before)


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_ileco_keeps_its_promise_in_neo(neo, family, tmp_path):
    """iLECO moves the Original prompt's prediction towards the base model's Target prediction (held-out noise)."""
    _load(neo, family)
    settings = Settings.from_layers(BASE, {"mode": "iLECO", "save_lora_name": f"il_{family}", "train_iterations": 60,
                                           "train_learning_rate": "3e-3"}, mode_inputs("iLECO", tmp_path))
    state, _ = load_lora(run_job(settings, WebUIHost(), events=Events())["lora_path"])
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle, torch.no_grad():
        network = build_network(bundle, NetworkSpec(network_type="lierla", rank=4, alpha=4))
        network.load_kohya_state_dict(state)
        network.attach()
        x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(123))
        sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
        original, target = bundle.encode_prompts(["a photo"] * 4), bundle.encode_prompts(["red"] * 4)
        with network.scaled(0.0):
            base_target, base_original = bundle.predict(x, sigma, target), bundle.predict(x, sigma, original)
        trained = bundle.predict(x, sigma, original)
        network.detach()
    before = (base_original - base_target).square().mean()
    after = (trained - base_target).square().mean()
    assert after < 0.6 * before  # measured: to 39 % (Z-Image) and 32 % (Anima) of the untrained distance


@pytest.mark.parametrize("family", ["zimage", "anima"])
def test_bf16_storage_trains_in_neos_compute_dtype(neo, family, tmp_path):
    """Neo stores weights in bf16 and computes in fp32 on CPU (its Linears cast per call): training predicts
    exactly what Neo's inference does (no bf16 autocast of its own) and trains."""
    import fake_neo_models
    from modules import sd_models

    title = CHECKPOINTS[family]
    make = {"zimage": fake_neo_models.neo_zimage, "anima": fake_neo_models.neo_anima}[family]
    sd_models.checkpoints_list[title].factory = lambda: make(storage_dtype=torch.bfloat16)
    engine = _load(neo, family)
    assert next(engine.forge_objects.unet.model.diffusion_model.parameters()).dtype == torch.bfloat16
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle, torch.no_grad():
        x, sigma = _latent(family).reshape(1, 16, 8, 8), torch.tensor([0.6])
        ours = x - sigma * bundle.predict(x, sigma, bundle.encode_prompts(["a photo"]))
    torch.testing.assert_close(ours, _generate(engine, family).reshape(1, 16, 8, 8), rtol=1e-5, atol=1e-5)
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": f"bf_{family}"}, mode_inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    state, _ = load_lora(result["lora_path"])
    assert result["status"] == "done" and max(float(v.abs().max()) for k, v in state.items() if k.endswith("up.weight")) > 0
