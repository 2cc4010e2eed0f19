"""Parity with what kohya users know: SDXL size conditioning, the latent cache's device contract,
CLIP skip, and the metadata keys kohya tools read."""

from __future__ import annotations

import types

import pytest
import torch
from PIL import Image

from trainer.models.bundle import Cond
from trainer.models.diffusers_runtime import DiffusersBundle

from .conftest import draw_image


def test_sdxl_lora_conditions_each_image_on_its_own_original_size_and_crop(trainer, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    draw_image(data / "wide.png", (200, 40, 40), size=(100, 70))  # not a bucket size: resized and cropped
    seen: list[torch.Tensor | None] = []
    original = DiffusersBundle.predict

    def spy(self, noisy, t, cond):
        seen.append(None if cond.size is None else cond.size.clone())
        return original(self, noisy, t, cond)

    monkeypatch.setattr(DiffusersBundle, "predict", spy)
    result = trainer.run(mode="LoRA", model="tiny-sdxl", lora_data_directory=str(data), train_batch_size=1,
                         train_iterations=1, effect_check=False, save_lora_name="sizes")
    assert result["status"] == "done"
    # bucket 64x64 (ratio 1.43 is nearer 1 than 2); height 70 → 64, width 100 · 64/70 → 91, centred crop from 13
    assert seen[0] is not None and seen[0].tolist() == [[70.0, 100.0, 0.0, 13.0, 64.0, 64.0]]


def test_diffusers_runtime_feeds_cond_size_as_time_ids(trainer):
    bundle = trainer.bundle("tiny-sdxl")
    cond = bundle.encode_prompts(["a photo", "red"])
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 600])
    default = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        plain = bundle.predict(noisy, t, cond)
        same = bundle.predict(noisy, t, cond.with_size(default))
        cropped = bundle.predict(noisy, t, cond.with_size(torch.tensor([[70.0, 100, 0, 13, 64, 64], [64, 64, 0, 0, 64, 64]])))
    assert torch.equal(plain, same)  # no size = an uncropped image of the latent's size
    assert (cropped[0] - plain[0]).abs().max() > 1e-4 and torch.equal(cropped[1], plain[1])


def test_cond_size_follows_select_repeat_and_cat():
    size = torch.tensor([[1.0, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    cond = Cond(torch.zeros(2, 3, 4), torch.zeros(2, 5)).with_size(size)
    assert cond.select([1]).size.tolist() == [size[1].tolist()]
    assert cond.repeat(2).size[:, 0].tolist() == [1, 1, 7, 7]
    assert Cond.cat([cond, cond]).size.shape == (4, 6)
    assert Cond.cat([cond, Cond(torch.zeros(1, 3, 4), torch.zeros(1, 5))]).size is None


def test_encoded_dataset_stays_on_the_cpu(tmp_path):
    """All cached latents once went to the training device at once; now only each step's batch does.
    ``meta`` stands in for the GPU: anything moved there is visibly not on the CPU."""
    from trainer.data import plan_samples
    from trainer.modes.setup import encode_dataset_images

    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 90)).save(tmp_path / f"i{i}.png")
    plan = plan_samples(sorted(tmp_path.glob("*.png")), size_hw=(64, 64), bucket_step=32, min_length=32, max_ratio=2)

    class Bundle:
        device, name = torch.device("meta"), "fake"

        def encode_images(self, pixels, generator=None):
            return torch.zeros(pixels.shape[0], 4, 8, 8)  # a VAE that hands back CPU latents

    events = types.SimpleNamespace(info=lambda *_: None, warning=lambda *_: None)
    ctx = types.SimpleNamespace(bundle=Bundle(), generator=lambda offset: torch.Generator(), events=events,
                                settings=types.SimpleNamespace(image_cache_latents_to_disk=False, vae="", logging_verbose=False),
                                note=lambda *_: None)
    cached = encode_dataset_images(ctx, plan)
    assert {b.latents.device.type for b in cached.buckets} == {"cpu"}
    assert {b.masks.device.type for b in cached.buckets} == {"cpu"}
    assert cached.gather(0, [0, 1], torch.device("meta")).latents.device.type == "meta"



# -- CLIP skip -------------------------------------------------------------------------------------------


def test_clip_skip_takes_the_nth_layer_from_the_end_through_the_final_norm(trainer):
    from trainer.errors import SettingsError

    bundle = trainer.bundle("tiny-sd1")
    te = bundle.text_encoders["lora_te"]
    ids = bundle._chunk_ids(bundle.tokenizers[0], ["a red photo"])
    with torch.no_grad():
        assert bundle.set_clip_skip(1) is None and bundle.clip_skip == 1
        last = bundle.encode_prompts(["a red photo"]).context
        assert bundle.set_clip_skip(2) is None and bundle.clip_skip == 2
        skipped = bundle.encode_prompts(["a red photo"]).context
        # kohya: hidden_states[-clip_skip], then the text model's final layer norm
        hidden = te(ids, output_hidden_states=True).hidden_states
        norm = getattr(te, "text_model", te).final_layer_norm
        assert torch.allclose(skipped, norm(hidden[-2]), atol=1e-6)
        assert torch.allclose(last, norm(hidden[-1]), atol=1e-6)
        assert (skipped - last).abs().max() > 1e-3
    depth = te.config.num_hidden_layers
    with pytest.raises(SettingsError, match="clip_skip"):
        bundle.set_clip_skip(depth + 1)
    bundle.set_clip_skip(1)


def test_clip_skip_does_not_apply_to_sdxl(trainer):
    bundle = trainer.bundle("tiny-sdxl")
    with torch.no_grad():
        before = bundle.encode_prompts(["a photo"]).context
        note = bundle.set_clip_skip(2)
        after = bundle.encode_prompts(["a photo"]).context
    assert "not used" in note and bundle.clip_skip is None and torch.equal(before, after)


# -- metadata --------------------------------------------------------------------------------------------


def test_metadata_records_clip_skip_autocast_mode_and_zero_terminal_snr(trainer, image_folder):
    from trainer.network import load_lora

    common = dict(mode="LoRA", model="tiny-sd1", lora_data_directory=str(image_folder), train_iterations=1,
                  effect_check=False)
    skip2 = trainer.run(save_lora_name="skip2", clip_skip=2, **common)
    meta = load_lora(skip2["lora_path"])[1]
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_mixed_precision"] == "no"  # fp32: no autocast (it was train_lora_precision, "fp32")
    assert meta["ss_zero_terminal_snr"] == "False"
    bf16 = trainer.run(save_lora_name="bf16", train_model_precision="bf16", **common)
    meta = load_lora(bf16["lora_path"])[1]
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_clip_skip"] == "1"


@pytest.mark.parametrize("mode", ["ADDifT", "Difference"])
def test_pair_modes_record_the_pairs_own_resolution(mode, trainer, tmp_path):
    from trainer.network import load_lora

    orig = draw_image(tmp_path / "o.png", (220, 40, 40), size=(96, 64))
    targ = draw_image(tmp_path / "t.png", (40, 60, 230), size=(96, 64))
    result = trainer.run(mode=mode, model="tiny-sd1", train_iterations=1, effect_check=False, save_lora_name=f"r_{mode}",
                         **{"original image": str(orig), "target image": str(targ), "image_size(height, width)": "128"})
    meta = load_lora(result["lora_path"])[1]
    assert meta["ss_resolution"] == "(96, 64)" and meta["modelspec.resolution"] == "96x64"
