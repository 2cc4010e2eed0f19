"""Each mode does what it promises, measured on held-out noise and timesteps (tiny SD1, fixed seeds).

"Prediction" for the image modes is the model's denoised estimate x̂₀ (from its ε/v output), the
quantity a sampler moves towards.
"""

from __future__ import annotations

import pytest
import torch

from trainer.modes.common import NoiseSchedule
from trainer.modes.inputs import denoised
from trainer.network import load_lora, network_from_file

from .conftest import fixed_noise

TIMESTEPS = torch.tensor([150, 350, 550, 750])
UNET_ONLY = {"network_blocks(BASE = TextEncoder)": ",".join(
    [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])}


def predictions(bundle, network, z, cond, multiplier):
    """The prediction at ``multiplier``; a prompt string is encoded at that multiplier too (TE adapters)."""
    with torch.no_grad(), network.scaled(multiplier):
        if isinstance(cond, str):
            cond = bundle.encode_prompts([cond] * z.shape[0])
        return bundle.predict(z, TIMESTEPS[: z.shape[0]], cond)


def attached(bundle, path):
    network = network_from_file(bundle, path)
    network.attach()
    return network


@pytest.mark.parametrize("target", ["a dog", ""])
def test_ileco_moves_the_original_prompt_to_the_target_and_leaves_others(trainer, target):
    result = trainer.run(mode="iLECO", model="tiny-sd1", save_lora_name="ileco", train_iterations=100,
                         train_learning_rate="3e-3", ileco_fixed_noise=False, **UNET_ONLY,
                         **{"original prompt": "a cat", "target prompt": target})
    assert result["status"] == "done"
    meta = load_lora(result["lora_path"])[1]
    assert meta["traintrain_original_prompt"] == "a cat" and meta["traintrain_target_prompt"] == target
    bundle = trainer.bundle("tiny-sd1")
    network = attached(bundle, result["lora_path"])
    try:
        z = fixed_noise((4, 4, 8, 8), seed=77)  # not the training noise
        c_o, c_t, c_u = "a cat", target, "mountain river at sunset, oil painting"
        goal = predictions(bundle, network, z, c_t, 0.0)
        before = (predictions(bundle, network, z, c_o, 0.0) - goal).pow(2).mean()
        after = (predictions(bundle, network, z, c_o, 1.0) - goal).pow(2).mean()
        assert after <= 0.5 * before, (float(before), float(after))
        moved_original = (predictions(bundle, network, z, c_o, 1.0) - predictions(bundle, network, z, c_o, 0.0)).pow(2).mean()
        moved_other = (predictions(bundle, network, z, c_u, 1.0) - predictions(bundle, network, z, c_u, 0.0)).pow(2).mean()
        assert moved_other < 0.5 * moved_original, (float(moved_other), float(moved_original))
    finally:
        network.detach()


def _x0(bundle, network, latent, eps, multiplier, cond):
    sched = NoiseSchedule(bundle.alphas_cumprod)
    t = TIMESTEPS[: latent.shape[0]]
    noisy = sched.add_noise(latent, eps, t)
    return denoised(sched, noisy, predictions(bundle, network, noisy, cond, multiplier), t, bundle.v_pred)


def _latents(bundle, pair):
    from .test_lora_mode import _pixels

    with torch.no_grad():
        both = torch.stack([_pixels(p) for p in pair])
        return bundle.encode_images(both, torch.Generator().manual_seed(0))


def test_difference_copier_learns_the_original_and_the_difference_moves_towards_the_target(trainer, image_pair):
    orig, targ = image_pair
    result = trainer.run(mode="Difference", model="tiny-sd1", save_lora_name="diff", train_iterations=40,
                         train_learning_rate="1e-2", diff_save_1st_pass=True, train_batch_size=2,
                         **{"original image": str(orig), "target image": str(targ)})
    assert result["status"] == "done"
    copy_path = trainer.lora_dir / "diff_copy.safetensors"
    assert copy_path.is_file() and str(copy_path) in result["files"]
    bundle = trainer.bundle("tiny-sd1")
    x_o, x_t = _latents(bundle, (orig, targ)).split(1)
    x_o, x_t = x_o.expand(4, -1, -1, -1), x_t.expand(4, -1, -1, -1)
    eps = fixed_noise(x_o.shape, seed=9)
    cond = bundle.encode_prompts([""]).repeat(4)
    sched = NoiseSchedule(bundle.alphas_cumprod)

    copier = attached(bundle, copy_path)
    try:  # the copier alone lowers the reconstruction (denoising) loss on the Original
        noisy = sched.add_noise(x_o, eps, TIMESTEPS)
        base = (predictions(bundle, copier, noisy, cond, 0.0) - eps).pow(2).mean()
        copied = (predictions(bundle, copier, noisy, cond, 1.0) - eps).pow(2).mean()
        assert copied < 0.95 * base, (float(base), float(copied))
    finally:
        copier.detach()

    diff = attached(bundle, result["lora_path"])
    try:  # with the copier removed, the difference LoRA alone moves x̂₀ of the Original towards the Target
        shift = _x0(bundle, diff, x_o, eps, 1.0, cond) - _x0(bundle, diff, x_o, eps, 0.0, cond)
        direction = x_t - x_o
        assert float((shift * direction).sum()) > 0, "the difference LoRA does not move towards the Target"
    finally:
        diff.detach()


def test_loading_the_copier_skips_pass_1_and_gives_the_same_result(trainer, image_pair):
    orig, targ = image_pair
    common = dict(mode="Difference", model="tiny-sd1", train_iterations=6, train_learning_rate="1e-2",
                  **{"original image": str(orig), "target image": str(targ)})
    first = trainer.run(save_lora_name="trained", diff_save_1st_pass=True, **common)
    copier = trainer.lora_dir / "trained_copy.safetensors"
    second = trainer.run(save_lora_name="reused", diff_load_1st_pass=str(copier), **common)
    assert [r["pass"] for r in second["history"].rows] == [2.0] * 6  # pass 1 skipped
    a, b = load_lora(first["lora_path"])[0], load_lora(second["lora_path"])[0]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_diff_1st_pass_only_really_saves_the_copier(trainer, image_pair):
    orig, targ = image_pair
    result = trainer.run(mode="Difference", model="tiny-sd1", save_lora_name="only", train_iterations=3,
                         diff_1st_pass_only=True, **{"original image": str(orig), "target image": str(targ)})
    assert result["lora_path"].endswith("only_copy.safetensors") and (trainer.lora_dir / "only_copy.safetensors").is_file()
    assert not (trainer.lora_dir / "only.safetensors").exists()


def _signed_shift(trainer, bundle, path, pair, prompt=""):
    """Projection of the LoRA's change of the prediction on noisy Original latents onto the difference
    D = ε̂(noisy Original) − ε̂(noisy Target) that the frozen model sees (held-out noise, same t).

    ADDifT trains +0.25·LoRA on the Target input to give the frozen prediction on the Original input,
    and −0.25·LoRA on the Original to give the Target's: at +1 the LoRA adds D (which for a denoiser
    moves the denoised image from the Original towards the Target), at −1 it subtracts it.
    """
    x_o, x_t = _latents(bundle, pair).split(1)
    x_o, x_t = x_o.expand(4, -1, -1, -1), x_t.expand(4, -1, -1, -1)
    eps = fixed_noise(x_o.shape, seed=31)
    cond = bundle.encode_prompts([prompt]).repeat(4)
    sched = NoiseSchedule(bundle.alphas_cumprod)
    a_in, b_in = sched.add_noise(x_o, eps, TIMESTEPS), sched.add_noise(x_t, eps, TIMESTEPS)
    network = attached(bundle, path)
    try:
        base = predictions(bundle, network, a_in, cond, 0.0)
        seen = base - predictions(bundle, network, b_in, cond, 0.0)
        return {m: float(((predictions(bundle, network, a_in, cond, m) - base) * seen).sum()) for m in (1.0, -1.0, 0.25, -0.25)}
    finally:
        network.detach()


def test_addift_is_a_signed_slider_from_original_to_target(trainer, image_pair):
    orig, targ = image_pair
    result = trainer.run(mode="ADDifT", model="tiny-sd1", save_lora_name="addift", train_iterations=60,
                         train_learning_rate="1e-3", network_type="c3lier", network_rank=16, network_alpha=16, train_batch_size=1, train_min_timesteps=200, train_max_timesteps=800,
                         **{"original image": str(orig), "target image": str(targ)})
    assert result["status"] == "done"
    # conditioning is encoded once here: no (zero) text-encoder adapters in the file (§17 #17)
    assert not any(k.startswith("lora_te") for k in load_lora(result["lora_path"])[0])
    shifts = _signed_shift(trainer, trainer.bundle("tiny-sd1"), result["lora_path"], (orig, targ))
    assert shifts[0.25] > 0 > shifts[-0.25], shifts  # the trained strengths move with the sign
    assert shifts[1.0] > shifts[-1.0], shifts  # and the slider's odd part grows with it at ±1


def _pairs(folder, count=3, captions=False):
    from .conftest import draw_image

    folder.mkdir()
    for i in range(count):
        draw_image(folder / f"p{i}.png", (220, 40 + 20 * i, 40), box=(10 + 3 * i, 12, 44, 46))
        draw_image(folder / f"p{i}_after.jpg", (40, 60 + 20 * i, 230), box=(10 + 3 * i, 12, 44, 46))  # another extension
        if captions:
            (folder / f"p{i}.txt").write_text(f"square {i}", encoding="utf-8")
            (folder / f"p{i}_after.txt").write_text(f"blue square {i}", encoding="utf-8")
    return folder


def test_multi_addift_learns_the_pairs_direction(trainer, tmp_path):
    folder = _pairs(tmp_path / "pairs")
    result = trainer.run(mode="Multi-ADDifT", model="tiny-sd1", save_lora_name="multi", train_iterations=60,
                         train_learning_rate="1e-3", network_type="c3lier", network_rank=16, network_alpha=16,
                         train_batch_size=2, train_min_timesteps=200, train_max_timesteps=800,
                         lora_data_directory=str(folder), diff_target_name="_after")
    assert result["status"] == "done" and result["steps"] == 60  # exact, no run-on to the end of an epoch
    assert load_lora(result["lora_path"])[1]["traintrain_pairs"] == "3"
    shifts = _signed_shift(trainer, trainer.bundle("tiny-sd1"), result["lora_path"],
                           (folder / "p0.png", folder / "p0_after.jpg"))
    assert shifts[0.25] > 0 > shifts[-0.25], shifts
    assert shifts[1.0] > shifts[-1.0], shifts


def test_multi_addift_conditions_each_pair_on_its_own_captions(trainer, tmp_path, monkeypatch):
    import trainer.modes.setup as setup

    seen = []
    original = setup.CaptionConds

    def spy(bundle, captions):
        seen.extend(captions)
        return original(bundle, captions)

    monkeypatch.setattr(setup, "CaptionConds", spy)
    folder = _pairs(tmp_path / "captioned", captions=True)
    result = trainer.run(mode="Multi-ADDifT", model="tiny-sd1", save_lora_name="captioned", train_iterations=3,
                         train_batch_size=1, lora_data_directory=str(folder), diff_target_name="_after",
                         lora_trigger_word="sq")
    assert result["steps"] == 3
    assert {f"sq, square {i}" for i in range(3)} | {f"sq, blue square {i}" for i in range(3)} == set(seen)
    assert "sq" in load_lora(result["lora_path"])[1]["ss_tag_frequency"]
