"""LoRA mode on every tiny family: the loss on its images falls, the file has the right keys and
metadata, and loading it into a fresh model reproduces the trained model's outputs."""

from __future__ import annotations

import pytest
import torch

from trainer.models.diffusers_runtime import load_bundle
from trainer.modes.common import NoiseSchedule
from trainer.network import load_lora, network_from_file

from .conftest import fixed_noise

FAMILIES = {
    "tiny-sd1": ("sd_v1", "lora_unet_down_blocks_", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    "tiny-sd2v": ("sd_v2_v", "lora_unet_down_blocks_", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    "tiny-sdxl": ("sdxl_base_v1-0", "lora_unet_input_blocks_", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
}


def denoise_loss(bundle, latents, cond, v_pred: bool) -> float:
    """Held-out noise and timesteps: MSE of the prediction against the training target."""
    sched = NoiseSchedule(bundle.alphas_cumprod)
    losses = []
    for seed in range(4):
        eps = fixed_noise(latents.shape, seed=1000 + seed)
        t = torch.randint(100, 900, (latents.shape[0],), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            pred = bundle.predict(sched.add_noise(latents, eps, t), t, cond)
        target = sched.v_target(latents, eps, t) if v_pred else eps
        losses.append(torch.nn.functional.mse_loss(pred, target).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_lora_learns_its_images_and_saves_a_loadable_kohya_file(model, trainer, image_folder):
    version, unet_prefix, te_key = FAMILIES[model]
    result = trainer.run(mode="LoRA", model=model, lora_data_directory=str(image_folder), save_lora_name=f"lora_{model}",
                         train_iterations=40, train_learning_rate="1e-2", **{"network_blocks(BASE = TextEncoder)": "BASE,"
                         + ",".join(f"IN{i:02d}" for i in range(12)) + ",M00," + ",".join(f"OUT{i:02d}" for i in range(12))})
    assert result["status"] == "done" and result["steps"] == 40
    assert [int(r["step"]) for r in result["history"].rows] == list(range(1, 41))  # exactly N steps
    path = result["lora_path"]
    state, meta = load_lora(path)
    assert meta["ss_base_model_version"] == version and meta["traintrain_mode"] == "LoRA"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert meta["ss_output_name"] == f"lora_{model}" and meta["sshs_model_hash"] and meta["modelspec.architecture"]
    assert any(k.startswith(unet_prefix) for k in state) and f"{te_key}.lora_down.weight" in state
    assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in state)
    assert meta["traintrain_report_health"] == "ok" and float(meta["traintrain_report_efficacy"]) > 0

    # a fresh model with the file loaded reproduces the trained in-process network exactly
    trained = trainer.networks[-1]
    fresh = load_bundle(model, device="cpu")
    loaded = network_from_file(fresh, path)
    bundle = trainer.bundle(model)
    captions = ["a shape"] * 2
    latents = fixed_noise((2, 4, 8, 8), seed=5) * 0.8
    t = torch.tensor([300, 700])
    trained.attach()
    loaded.attach()
    try:
        with torch.no_grad():
            ours = bundle.predict(latents, t, bundle.encode_prompts(captions))
            theirs = fresh.predict(latents, t, fresh.encode_prompts(captions))
        assert torch.allclose(ours, theirs, atol=1e-5)
    finally:
        trained.detach()
        loaded.detach()

    # the training loss on the images falls with the LoRA applied
    images = torch.stack([bundle.encode_images(_pixels(p)[None], torch.Generator().manual_seed(0))[0]
                          for p in sorted(image_folder.glob("*.png"))[:2]])
    cond = fresh.encode_prompts(captions)
    with loaded.scaled(0.0):
        before = denoise_loss(fresh, images, cond, fresh.v_pred)
    loaded.attach()
    try:
        after = denoise_loss(fresh, images, cond, fresh.v_pred)
    finally:
        loaded.detach()
    assert after < before * 0.97, (before, after)


def _pixels(path):
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
