"""Training in place inside Forge and Forge Neo, against a fake that behaves as real builds do
(``fake_forge/``, ``fake_forge_models.py``): weights built under inference mode, residuals added in place,
no model loaded until a generation asks for one. Each of these broke the first job in a real Forge."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import mode_inputs
from PIL import Image

from trainer.errors import TrainTrainError
from trainer.hosts.webui import WebUIHost
from trainer.network import load_lora
from trainer.progress import Events
from trainer.runner import run_job
from trainer.settings import Settings

BASE = {"image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32, "train_iterations": 3,
        "train_batch_size": 1, "train_seed": 0, "train_model_precision": "fp32", "save_precision": "fp32",
        "network_rank": 4, "network_alpha": 4, "logging_save_csv": False, "train_learning_rate": "1e-2"}


_inputs = mode_inputs


def _generate(shared) -> torch.Tensor:
    """One U-Net prediction exactly as a generation computes it (inference mode, in-place adds)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    return shared.sd_model.generate(x, torch.tensor([500]), ["a photo"])


def _loaded(shared):
    from modules import sd_models

    sd_models.forge_model_reload()
    return shared.sd_model


def test_the_fake_fails_as_forge_does_without_our_handling(forge):
    """The behaviour the real builds showed, kept true in the fake so the suite cannot pass while Forge fails."""
    engine = _loaded(forge)
    unet = engine.forge_objects.unet.model.diffusion_model
    assert all(p.is_inference() for p in unet.parameters())
    clip = list(engine.cond_stage_model.parameters())
    assert all(p.is_inference() and p.requires_grad for p in clip)
    with pytest.raises(RuntimeError, match="InferenceMode"):
        clip[0].requires_grad_(False)
        clip[0].requires_grad_(True)
    extra = torch.zeros(1, requires_grad=True)
    x = torch.randn(1, 4, 8, 8) + extra
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        unet(x, timesteps=torch.tensor([1]), context=torch.randn(1, 77, 32)).sum().backward()


def test_a_job_before_any_generation_trains_the_selected_checkpoint(forge, tmp_path):
    """Neo: shared.sd_model is None until the first generation; the job loads the selected checkpoint."""
    from modules import sd_models

    assert forge.sd_model is None
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "first"}, _inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    assert WebUIHost().name == "forge"
    assert result["status"] == "done" and sd_models.loads == ["base.safetensors [abc]"]
    _, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == "sd_v1"


def test_nothing_selected_is_one_clear_line(forge):
    from modules import sd_models

    sd_models.model_data.forge_loading_parameters = {}
    with pytest.raises(TrainTrainError, match="no checkpoint selected.*checkpoint dropdown"):
        with WebUIHost().acquire("", "", precision="fp32", v_pred=None):
            pass


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
def test_every_mode_trains_and_generation_is_unchanged_after(forge, mode, tmp_path, caplog):
    engine = _loaded(forge)
    before = _generate(forge)
    text_flags = [(p.is_inference(), p.requires_grad) for p in engine.cond_stage_model.parameters()]
    settings = Settings.from_layers(BASE, {"mode": mode, "save_lora_name": f"f_{mode}"}, _inputs(mode, tmp_path))
    with caplog.at_level(logging.WARNING, logger="traintrain"):
        result = run_job(settings, WebUIHost(), events=Events())
    assert result["status"] == "done" and result["steps"] == 3
    state, _ = load_lora(result["lora_path"])
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and max(float(v.abs().max()) for v in ups) > 0  # gradients reached the adapters
    assert forge.sd_model is engine
    assert torch.equal(_generate(forge), before)  # the no-LoRA generation is bit-identical
    # the restore put requires_grad=True back on Forge's inference-mode text-encoder weights, quietly
    assert [(p.is_inference(), p.requires_grad) for p in engine.cond_stage_model.parameters()] == text_flags
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]


def test_gradient_checkpointing_is_exact_under_in_place_adds(forge):
    """Forge's ``x += n`` runs out of place while we train, also in the checkpointed recomputation."""
    _loaded(forge)
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        cond = bundle.encode_prompts(["a", "b"])
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        proj = bundle.unet.input_blocks[1][1].proj_out
        extra = torch.nn.Parameter(torch.zeros_like(proj.weight))
        proj.forward = lambda x: torch.nn.functional.conv2d(x, proj.weight + extra, proj.bias)

        def grad(checkpointing: bool) -> torch.Tensor:
            bundle.set_gradient_checkpointing(checkpointing)
            extra.grad = None
            bundle.predict(z, torch.tensor([10, 700]), cond).square().mean().backward()
            return extra.grad.clone()

        plain, checkpointed = grad(False), grad(True)
        bundle.set_gradient_checkpointing(False)
        del proj.__dict__["forward"]
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_sdxl_trains_in_forge(forge, tmp_path):
    from modules import sd_models

    sd_models.select("xl.safetensors [def]")
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "xl"}, _inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events())
    state, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)


def test_previews_render_in_forge(forge, tmp_path):
    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "pv", "sample_every_n_steps": 2,
                                           "sample_prompts": "a photo --w 64 --h 64 --s 2"}, _inputs("LoRA", tmp_path))
    result = run_job(settings, WebUIHost(), events=Events(), logs_root=tmp_path / "logs")
    assert result["status"] == "done"
    assert sorted((tmp_path / "logs").rglob("*.png"))


def test_quantized_unet_refused(forge):
    import fake_forge_models
    from modules import sd_models

    sd_models.checkpoints_list["base.safetensors [abc]"].factory = lambda: fake_forge_models.StableDiffusion(
        fake_forge_models.fake_models.LatentDiffusion(seed=1), storage_dtype=torch.float8_e4m3fn)
    with pytest.raises(TrainTrainError, match="Forge stores this U-Net"):
        with WebUIHost().acquire("", "", precision="fp16", v_pred=None):
            pass


def test_preview_images_reach_the_gallery_on_a_fresh_neo(forge, tmp_path):
    """Neo writes a tab's PIL images into opts.temp_dir (default <data>/tmp), which nothing creates: the
    first preview update failed with FileNotFoundError. The host creates the folder when the tab is built."""
    from modules import ui_tempdir

    forge.opts.temp_dir = str(tmp_path / "tmp")
    with pytest.raises(FileNotFoundError):
        ui_tempdir.save_pil_to_file(Image.new("RGB", (8, 8)))
    WebUIHost()  # what the tab builds first
    saved = ui_tempdir.save_pil_to_file(Image.new("RGB", (8, 8)))
    assert Image.open(saved).size == (8, 8)


def test_forge_adapts_the_same_modules_as_a1111(forge, models, tmp_path):
    """Forge and Neo build every Linear as their own ``ForgeOperations.Linear`` (not an ``nn.Linear``): a real
    Neo trained only the 32 convolutions of an SD1 U-Net while we selected by ``nn.Linear``."""
    from trainer.models.webui_runtime import WebUIBundle
    from trainer.network import NetworkSpec, build_network

    settings = Settings.from_layers(BASE, {"mode": "LoRA", "save_lora_name": "lin"}, _inputs("LoRA", tmp_path))
    state, _ = load_lora(run_job(settings, WebUIHost(), events=Events())["lora_path"])
    in_forge = {k.split(".")[0] for k in state}
    a1111 = WebUIBundle(models.LatentDiffusion(seed=1), device=torch.device("cpu"))
    expected = {n for n in build_network(a1111, NetworkSpec(network_type="lierla", rank=4, alpha=4)).adapters
                if n.startswith("lora_unet_")}  # Forge trains the U-Net only
    assert in_forge == expected
    assert sum("attn1_to_q" in name for name in in_forge) > 0
