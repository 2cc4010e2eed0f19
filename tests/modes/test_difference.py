"""Difference mode: a reused copier equals the trained one at any strength; pass 2 reads its own settings."""

from __future__ import annotations

import torch

from trainer.network import load_lora, network_from_file


def _pair_values(image_pair) -> dict:
    orig, targ = image_pair
    return {"mode": "Difference", "model": "tiny-sd1", "train_learning_rate": "1e-2",
            "original image": str(orig), "target image": str(targ)}


def test_a_reused_copier_gives_the_trained_result_at_strength_4(trainer, image_pair):
    # the strength was baked into <name>_copy.safetensors and loaded as is: max |delta| 0.228 at strength 4
    common = dict(_pair_values(image_pair), train_iterations=4, network_strength=4)
    first = trainer.run(save_lora_name="trained", diff_save_1st_pass=True, **common)
    trained_copier = trainer.networks[0]
    copy_path = trainer.lora_dir / "trained_copy.safetensors"
    assert load_lora(copy_path)[1]["traintrain_network_strength"] == "4.0"
    reused_copier = network_from_file(trainer.bundle("tiny-sd1"), copy_path, trained=True)  # as pass 2 loads it
    for name, adapter in trained_copier.adapters.items():
        assert torch.allclose(adapter.delta_weight(), reused_copier.adapters[name].delta_weight(), atol=1e-6), name
    second = trainer.run(save_lora_name="reused", diff_load_1st_pass=str(copy_path), **common)
    a, b = load_lora(first["lora_path"])[0], load_lora(second["lora_path"])[0]
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
