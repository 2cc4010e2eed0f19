"""Previews inside A1111 go through its own txt2img path on the model being trained (fake Web-UI), see
the adapters, and leave the Web-UI as it was: cond caches, progress fields, params.txt, the global RNG,
extra networks and the model itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fingerprint
from PIL import Image

from trainer.hosts.webui import WebUIHost
from trainer.progress import Events, HistorySink
from trainer.runner import run_job
from trainer.sampling.prompts import SamplePrompt
from trainer.settings import Settings

BASE = {"image_size(height, width)": "64", "train_iterations": 4, "train_batch_size": 1, "train_seed": 0,
        "train_model_precision": "fp32", "save_precision": "fp32", "network_rank": 4, "network_alpha": 4,
        "logging_save_csv": False, "effect_check": False, "mode": "iLECO",
        "original prompt": "a photo", "target prompt": "red"}


def _run(tmp_path, **values):
    history = HistorySink()
    settings = Settings.from_layers(BASE, values)
    result = run_job(settings, WebUIHost(), events=Events([history]), logs_root=tmp_path / "logs")
    return result, history


def test_previews_use_the_webui_sampler_and_leave_it_as_it_was(webui, tmp_path):
    from modules import processing

    processing.calls.clear()
    before = fingerprint(webui.sd_model)
    result, history = _run(tmp_path, save_lora_name="wp", sample_every_n_steps=2, sample_sampler="DDIM",
                           sample_prompts="a photo <lora:other:1> --s 2 --l 5 --d 11 --w 32")
    assert result["status"] == "done"
    # steps 2 and 4, a −1/0/+1 strip each: six txt2img calls, all with the prompt's options and the sampler
    assert len(processing.calls) == 6
    assert all(c["sampler"] == "DDIM" and c["steps"] == 2 and c["seed"] == 11 and c["size"] == (32, 64) for c in processing.calls)
    assert not any(c["extra_networks"] or c["scripts"] for c in processing.calls)
    import networks

    assert networks.loaded_networks == []  # the <lora:other> tag was not activated
    assert [(e.step, Image.open(e.path).size) for e in history.previews] == [(2, (96, 64)), (4, (96, 64))]
    assert all(str(e.path).startswith(str(tmp_path / "logs")) and "/samples/" in e.path for e in history.previews)
    assert fingerprint(webui.sd_model) == before


def test_a_render_keeps_caches_state_rng_and_params(webui, tmp_path):
    from modules import paths, processing

    host = WebUIHost()
    with host.acquire("", "", precision="fp32", v_pred=None) as bundle:
        bundle.offload("vae", "text_encoders")  # as the modes do: the render brings them back, then offloads again
        renderer = bundle.preview_renderer()
        cls = processing.StableDiffusionProcessing
        cached_c, cached_uc = ["old key", "old cond"], ["old neg", "old uncond"]
        cls.cached_c, cls.cached_uc = cached_c, cached_uc
        (tmp_path / "params.txt").write_text("the user's last generation", encoding="utf-8")
        webui.state.textinfo, webui.state.sampling_step, webui.state.sampling_steps = "TrainTrain step 3/9", 3, 9
        schedule = webui.sd_model.alphas_cumprod
        torch.manual_seed(5)
        expected = torch.randn(4)
        torch.manual_seed(5)
        from trainer.sampling.hook import isolated

        with isolated([bundle.unet], bundle.device):
            image = renderer(SamplePrompt("a photo", width=64, height=64, steps=2, seed=1), "Euler")
        assert image.size == (64, 64)
        assert cls.cached_c is cached_c and cached_c == ["old key", "old cond"]
        assert cls.cached_uc is cached_uc and cached_uc == ["old neg", "old uncond"]
        assert (webui.state.textinfo, webui.state.sampling_step, webui.state.sampling_steps) == ("TrainTrain step 3/9", 3, 9)
        assert (tmp_path / "params.txt").read_text(encoding="utf-8") == "the user's last generation"
        assert webui.sd_model.alphas_cumprod is schedule
        assert torch.equal(torch.randn(4), expected)
        assert next(webui.sd_model.first_stage_model.parameters()).device.type == "cpu"
        assert paths.data_path == str(tmp_path)


@pytest.mark.parametrize("checkpoint", ["base.safetensors [abc]", "xl.safetensors [def]"])
def test_the_webui_sampler_sees_the_adapters(webui, tmp_path, checkpoint):
    from modules import sd_models

    from trainer.network import NetworkSpec, build_network

    sd_models.reload_model_weights(info=sd_models.checkpoints_list[checkpoint])
    host = WebUIHost()
    prompt = SamplePrompt("a photo", width=64, height=64, steps=2, cfg_scale=1.0, seed=3)
    with host.acquire("", "", precision="fp32", v_pred=None) as bundle:
        renderer = bundle.preview_renderer()
        base = np.asarray(renderer(prompt, "Euler"), dtype=np.float32)
        settings = Settings.from_layers(BASE, {"network_rank": 4})
        network = build_network(bundle, NetworkSpec.from_settings(settings), device=bundle.device)
        with torch.no_grad():
            for name, p in network.named_parameters():
                if "lora_up" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        network.attach()
        try:
            with network.scaled(0.0):
                zero = np.asarray(renderer(prompt, "Euler"), dtype=np.float32)
            with network.scaled(1.0):
                one = np.asarray(renderer(prompt, "Euler"), dtype=np.float32)
        finally:
            network.detach()
    assert np.array_equal(zero, base)  # weight 0 is the base model, exactly
    assert np.abs(one - base).mean() > 1  # the Web-UI's sampler ran through our adapters


def test_a_checkpoint_setting_that_names_another_model_falls_back_to_our_loop(webui, tmp_path):
    from modules import sd_models

    from trainer.sampling.render import OwnLoopRenderer

    host = WebUIHost()
    prompt = SamplePrompt("x", width=64, height=64, steps=1, seed=0)
    notes: list[str] = []
    with host.acquire("", "", precision="fp32", v_pred=None) as bundle:
        webui.opts.sd_model_checkpoint = "xl.safetensors [def]"
        try:
            renderer = bundle.preview_renderer()
            with pytest.raises(Exception, match="sample_every_n_steps to 0"):  # no fallback offered: refused
                renderer(prompt, "Euler")
            renderer.fallback, renderer.note = OwnLoopRenderer(bundle), notes.append
            for _ in range(2):
                assert renderer(prompt, "Euler").size == (64, 64)
        finally:
            webui.opts.sd_model_checkpoint = "base.safetensors [abc]"
    assert sd_models.loads == []  # no checkpoint was loaded for the preview
    assert len(notes) == 1 and "own sampler" in notes[0]  # said once, the run goes on


def test_forge_previews_use_our_loop(webui):
    from trainer.models.webui_runtime import WebUIBundle

    bundle = WebUIBundle.__new__(WebUIBundle)
    bundle.forge = True
    assert bundle.preview_renderer() is None
