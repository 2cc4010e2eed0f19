"""Run setup (trainer/modes/setup.py): settings that act through the run context, not a mode."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import SettingsError
from trainer.models.diffusers_runtime import DiffusersBundle
from trainer.modes.common import resolve_vae_precision


@pytest.fixture
def encodes(monkeypatch) -> list[tuple[torch.dtype, torch.Tensor]]:
    """Every standalone encode of a run: (the VAE's weight dtype at that moment, the latents)."""
    seen: list[tuple[torch.dtype, torch.Tensor]] = []
    original = DiffusersBundle.encode_images

    def spy(self, pixels, generator=None):
        latents = original(self, pixels, generator)
        seen.append((next(self.vae.parameters()).dtype, latents))
        return latents

    monkeypatch.setattr(DiffusersBundle, "encode_images", spy)
    return seen


def test_vae_precision_is_the_dtype_images_are_encoded_in(trainer, image_folder, encodes):
    common = dict(mode="LoRA", model="tiny-sd1", train_iterations=1, lora_data_directory=str(image_folder),
                  effect_check=False)  # the report card encodes its probe images too
    trainer.run(save_lora_name="fp32", train_VAE_precision="fp32", **common)
    trainer.run(save_lora_name="bf16", train_VAE_precision="bf16", **common)
    again = trainer.run(save_lora_name="again", train_VAE_precision="fp32", **common)  # the cached bundle resets
    (d32, z32), (d16, z16), (d32b, z32b) = [encodes[i] for i in (0, len(encodes) // 3, -1)][:3]
    assert (d32, d16, d32b) == (torch.float32, torch.bfloat16, torch.float32)
    assert torch.equal(z32, z32b) and again["status"] == "done"
    # bf16 rounds the encode (relative ~1e-2), it does not change what is encoded
    rel = float((z16 - z32).norm() / z32.norm())
    assert 1e-4 < rel < 5e-2, rel


def test_fp16_vae_on_cpu_encodes_in_fp32_and_says_so(trainer, image_folder, encodes):
    result = trainer.run(mode="LoRA", model="tiny-sd1", train_iterations=1, lora_data_directory=str(image_folder),
                         train_VAE_precision="fp16")
    assert {dtype for dtype, _ in encodes} == {torch.float32}
    assert any("train_VAE_precision fp16" in n and "fp32" in n for n in result["notes"])


def test_vae_precision_names_dtypes_and_refuses_others():
    cpu = torch.device("cpu")
    assert resolve_vae_precision("bf16", cpu) == (torch.bfloat16, None)
    assert resolve_vae_precision("FP32", cpu) == (torch.float32, None)
    assert resolve_vae_precision("fp16", torch.device("cuda")) == (torch.float16, None)
    with pytest.raises(SettingsError, match="train_VAE_precision.*fp32, bf16 or fp16"):
        resolve_vae_precision("int8", cpu)


@pytest.mark.parametrize("verbose", [False, True])
def test_logging_verbose_prints_dataset_counts_and_every_adapted_module(verbose, trainer, image_folder):
    (image_folder / "img3.txt").unlink()  # one image without a caption file
    result = trainer.run(mode="LoRA", model="tiny-sd1", train_iterations=1, lora_data_directory=str(image_folder),
                         logging_verbose=verbose)
    lines = [m.text for m in result["history"].messages]
    network = trainer.networks[-1]
    module_lines = [t for t in lines if any(t.strip().startswith(f"{name},") for name in network.adapters)]
    dataset = [t for t in lines if t.startswith("Dataset:")]
    if not verbose:
        assert module_lines == [] and dataset == []
        return
    assert len(module_lines) == len(network.adapters) > 0
    assert dataset == ["Dataset: 4 image files, 3 with a caption file (.txt/.caption), 1 without; 4 samples"]
    assert any(t.startswith("Buckets (width x height: samples): 64x64: 4") for t in lines)


def test_latent_disk_cache_is_kept_per_vae_precision(trainer, image_folder, encodes):
    common = dict(mode="LoRA", model="tiny-sd1", train_iterations=1, lora_data_directory=str(image_folder),
                  image_cache_latents_to_disk=True, effect_check=False)
    counts = []
    for precision in ("fp32", "bf16", "fp32", "bf16"):
        trainer.run(save_lora_name=f"c_{precision}", train_VAE_precision=precision, **common)
        counts.append(len(encodes))
    assert counts[0] > 0 and counts[1] > counts[0]  # a bf16 run does not take the fp32 latents ...
    assert counts[3] == counts[2] == counts[1]  # ... and each precision finds its own cache afterwards
