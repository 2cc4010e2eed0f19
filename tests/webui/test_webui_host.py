"""WebUIHost.acquire: lock, job state, model switching, merged-Lora cleanup and a bit-exact restore."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers import fingerprint

from trainer.errors import TrainTrainError
from trainer.hosts.base import Host
from trainer.hosts.webui import WebUIHost


def train_a_little(bundle):
    """What a mode does inside the span, plus the mess an error could leave behind."""
    bundle.set_gradient_checkpointing(True)
    lin = bundle.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    extra = torch.nn.Parameter(torch.zeros(lin.out_features, lin.in_features))
    lin.forward = lambda x: torch.nn.functional.linear(x, lin.weight + extra, lin.bias)  # an adapter left attached
    bundle.offload("vae")
    cond = bundle.encode_prompts(["a photo", "red"])
    out = bundle.predict(torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), cond)
    out.square().mean().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    bundle.unet.out[2].weight.requires_grad_(True)  # someone flips a flag
    bundle.unet.train()
    return extra


def test_host_protocol_and_lists(webui, tmp_path):
    host = WebUIHost()
    assert isinstance(host, Host) and host.name == "a1111"
    assert host.list_models() == ["base.safetensors [abc]", "xl.safetensors [def]"]
    assert host.list_vaes() == ["", "better.vae.pt"]
    assert host.default_model() == "" and host.loaded_model() == "base.safetensors [abc]"  # "" = the loaded one
    assert host.lora_dir() == tmp_path / "Lora" and (tmp_path / "Lora").is_dir()
    host.report(3, 10, "step 3/10")
    assert (webui.state.sampling_step, webui.state.sampling_steps, webui.state.textinfo) == (3, 10, "step 3/10")
    assert host.interrupted() is False
    webui.state.interrupted = True
    assert host.interrupted() is True


def test_on_saved_writes_sidecar_and_refreshes(webui, tmp_path):
    import networks

    networks.refreshes.clear()
    lora = tmp_path / "Lora" / "cat.safetensors"
    WebUIHost().on_saved(lora, {"activation text": "cat", "preferred weight": 0.8, "sd version": "SD1"})
    assert json.loads(lora.with_suffix(".json").read_text())["activation text"] == "cat"
    assert networks.refreshes == [1]


@pytest.mark.parametrize("fail", [False, True])
def test_acquire_holds_lock_and_restores_bit_exact(webui, fail):
    from modules.call_queue import queue_lock
    from modules.processing import StableDiffusionProcessing

    model = webui.sd_model
    before = fingerprint(model)
    assert any(before["requires_grad"]) and not any(before["training"])
    StableDiffusionProcessing.cached_c = ["stale", 1]
    seen = {}

    def other_thread():
        seen["got_lock"] = queue_lock.acquire(blocking=False)
        if seen["got_lock"]:
            queue_lock.release()

    with pytest.raises(RuntimeError, match="boom") if fail else _nothing():
        with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            assert seen["got_lock"] is False, "a generation could run during training"
            assert webui.state.job == "traintrain"
            assert not any(p.requires_grad for p in model.parameters())
            train_a_little(bundle)
            if fail:
                raise RuntimeError("boom")
    assert not queue_lock.locked()
    assert webui.state.events == ["begin:traintrain", "end"]
    assert StableDiffusionProcessing.cached_c == [None, None]
    assert fingerprint(model) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_lowvram_refused_without_taking_the_lock(webui):
    from modules.call_queue import queue_lock

    webui.cmd_opts.lowvram = True
    with pytest.raises(TrainTrainError, match="--lowvram"):
        with WebUIHost().acquire("", "", precision="fp16", v_pred=None):
            pass
    assert not queue_lock.locked() and webui.state.events == []


def test_medvram_notes_and_unet_only(webui):
    webui.cmd_opts.medvram = True
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        assert bundle.text_encoders == {}
        assert any("cached first" in n for n in bundle.notes)


def test_merged_lora_leftover_is_undone(webui):
    import networks

    model = webui.sd_model
    pristine = fingerprint(model)["tensors"]
    target = model.model.diffusion_model.middle_block[1].proj_in
    networks.merge_into(target, torch.full_like(target.weight, 0.5))
    assert fingerprint(model)["tensors"] != pristine
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None):
        assert fingerprint(model)["tensors"] == pristine
        assert networks.loaded_networks == []
    assert fingerprint(model)["tensors"] == pristine


def test_merged_lora_without_extension_is_refused(webui, monkeypatch):
    import sys

    model = webui.sd_model
    target = model.model.diffusion_model.out[2]
    target.network_current_names = (("x", 1.0, 1.0, None),)
    monkeypatch.setitem(sys.modules, "networks", None)  # extension not importable
    with pytest.raises(TrainTrainError, match="still merged"):
        with WebUIHost().acquire("", "", precision="fp32", v_pred=None):
            pass
    from modules.call_queue import queue_lock

    assert not queue_lock.locked() and webui.state.events == ["begin:traintrain", "end"]


def test_other_model_and_vae_loaded_then_restored(webui):
    from modules import sd_models, sd_vae

    base = webui.sd_model
    with WebUIHost().acquire("xl.safetensors", "better.vae.pt", precision="fp32", v_pred=None) as bundle:
        assert webui.sd_model is not base and bundle.family.value == "sdxl"
        assert sd_vae.loaded_vae_file == "/vae/better.vae.pt"
    assert webui.sd_model is base
    assert sd_models.loads == ["xl.safetensors [def]", "base.safetensors [abc]"]
    assert sd_vae.reloads == ["/vae/better.vae.pt", None]


def test_unknown_model_refused(webui):
    with pytest.raises(TrainTrainError, match="not one of the Web-UI's checkpoints"):
        with WebUIHost().acquire("nope", "", precision="fp32", v_pred=None):
            pass


@pytest.mark.parametrize("source", ["option", "model_flag", "none"])
def test_zero_terminal_snr_follows_the_webui(webui, source):
    """A1111 1.10 rescales ᾱ only from its noise-schedule option; later A1111/Forge set sd_model.ztsnr
    from a checkpoint's ztsnr key. Either way training uses the rescaled schedule, from the original ᾱ."""
    from trainer.models.components import rescale_zero_terminal_snr

    original = webui.sd_model.alphas_cumprod_original.clone()
    if source == "option":
        webui.opts.sd_noise_schedule = "Zero Terminal SNR"
    elif source == "model_flag":
        webui.sd_model.ztsnr = True
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        if source == "none":
            assert not bundle.zero_snr and torch.equal(bundle.alphas_cumprod, original.float())
        else:
            assert bundle.zero_snr and bundle.alphas_cumprod[-1] == 0
            torch.testing.assert_close(bundle.alphas_cumprod, rescale_zero_terminal_snr(original.float()))
            assert any("zero-terminal SNR" in n for n in bundle.notes)
    assert torch.equal(webui.sd_model.alphas_cumprod_original, original)  # the host's table is untouched


def test_use_ema_is_a_note_in_the_webui(webui):
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None, use_ema=True) as bundle:
        assert any("model_use_ema" in n and "standalone" in n for n in bundle.notes)


def test_host_clip_skip_per_family():
    from types import SimpleNamespace

    from trainer.hosts.webui import _host_clip_skip
    from trainer.models.bundle import Family

    opts = SimpleNamespace(CLIP_stop_at_last_layers=2)
    assert _host_clip_skip(opts, Family.SD1, forge=False) == 2
    assert _host_clip_skip(opts, Family.SD2, forge=False) == 1  # A1111's SD2 encoder ignores the option
    assert _host_clip_skip(opts, Family.SD2, forge=True) == 2
    assert _host_clip_skip(opts, Family.SDXL, forge=False) is None
