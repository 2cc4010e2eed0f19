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
    second = trainer.run(save_lora_name="reused", diff_load_1st_pass=str(copy_path), **common)
    a, b = load_lora(first["lora_path"])[0], load_lora(second["lora_path"])[0]
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    assert load_lora(copy_path)[1]["traintrain_network_strength"] == "4.0"
    reused_copier = network_from_file(trainer.bundle("tiny-sd1"), copy_path, trained=True)  # as pass 2 loads it
    for name, adapter in trained_copier.adapters.items():
        assert torch.allclose(adapter.delta_weight(), reused_copier.adapters[name].delta_weight(), atol=1e-6), name

def _pass2_run(trainer, image_pair, name, **pass2):
    return trainer.run(save_lora_name=name, train_iterations=2, **_pair_values(image_pair),
                       **{"2nd pass": {"use_2nd_pass_settings": True, **pass2}})


def test_pass_2_trains_with_its_own_seed(trainer, image_pair):
    # pass 2 drew from the job's seed: pass-2 seeds 1 and 2 gave a bit-identical LoRA
    one, two = (_pass2_run(trainer, image_pair, f"seed{k}", train_seed=k) for k in (1, 2))
    again = _pass2_run(trainer, image_pair, "seed1_again", train_seed=1)
    a, b, c = (load_lora(r["lora_path"]) for r in (one, two, again))
    assert a[1]["ss_seed"] == "1" and b[1]["ss_seed"] == "2"
    assert max(float((a[0][k] - b[0][k]).abs().max()) for k in a[0]) > 1e-4  # another seed, another LoRA
    assert all(torch.equal(a[0][k], c[0][k]) for k in a[0])  # and the same seed the same one


def test_pass_2_uses_its_own_lora_precision_and_checkpointing(trainer, image_pair, monkeypatch):
    from trainer.models.diffusers_runtime import DiffusersBundle

    calls = []
    original = DiffusersBundle.set_gradient_checkpointing

    def spy(self, enabled):
        calls.append((len(trainer.networks), bool(enabled)))  # networks built so far: 1 = in pass 2
        return original(self, enabled)

    monkeypatch.setattr(DiffusersBundle, "set_gradient_checkpointing", spy)
    result = _pass2_run(trainer, image_pair, "own", train_lora_precision="bf16", use_gradient_checkpointing=True,
                        train_model_precision="bf16", model_v_pred=True, save_overwrite=False)
    assert result["status"] == "done"
    copier, diff = trainer.networks
    assert {p.dtype for p in copier.parameters()} == {torch.float32}
    assert {p.dtype for p in diff.parameters()} == {torch.bfloat16}
    assert (1, True) in calls and calls[-1] == (2, False)  # on for pass 2 only, off again at the end
    assert not any(enabled for built, enabled in calls if built == 0)
    notes = " ".join(result["notes"])  # job-wide values are named, not silently dropped
    assert "2nd pass train_model_precision = bf16 is not used" in notes and "2nd pass model_v_pred" in notes
    assert "2nd pass save_overwrite" in notes
