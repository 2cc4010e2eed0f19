"""The practitioners' controls, measured end to end on tiny models: kohya repeats and train_epochs,
caption controls as fed to the text encoder, masked loss gradients, noise controls and min-SNR in
every noised mode, and regularization images keeping the model near its base on the class."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from trainer.models.diffusers_runtime import DiffusersBundle
from trainer.modes.common import NoiseControls
from trainer.network import load_lora
from trainer.progress import ProgressEvent

from .conftest import draw_image

UNET_ONLY = {"network_blocks(BASE = TextEncoder)": ",".join([f"IN{i:02d}" for i in range(12)] + ["M00"]
                                                            + [f"OUT{i:02d}" for i in range(12)])}


def kohya_folder(root, *, captions: bool = True):
    """``3_sks cat/`` (2 images, repeats 3) and ``1_dog/`` (2 images, repeats 1)."""
    cat, dog = root / "3_sks cat", root / "1_dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    for folder, colors in ((cat, [(220, 40, 40), (40, 200, 60)]), (dog, [(50, 60, 220), (230, 200, 40)])):
        for i, color in enumerate(colors):
            path = draw_image(folder / f"{folder.name[-3:]}{i}.png", color, box=(8 + 6 * i, 10, 40 + 6 * i, 50))
            if captions:
                path.with_suffix(".txt").write_text(f"sks, {folder.name[-3:]}, red, square, shape{i}", encoding="utf-8")
    return root


class Epochs:
    def __init__(self) -> None:
        self.by_step: dict[int, int] = {}

    def on_event(self, event) -> None:
        if isinstance(event, ProgressEvent):
            self.by_step[event.step] = (event.epoch, event.epochs)

    def close(self) -> None:
        pass


def test_epochs_times_repeats_set_the_steps_show_the_plan_and_save_each_epoch(trainer, tmp_path, monkeypatch):
    data = kohya_folder(tmp_path / "data")
    epochs = Epochs()
    import trainer.progress as progress

    original = progress.Events.__init__
    monkeypatch.setattr(progress.Events, "__init__", lambda self, sinks=None: original(self, [*(sinks or []), epochs]))
    import trainer.data.plan as planning

    opened: list[str] = []
    real_open = planning.open_image
    monkeypatch.setattr(planning, "open_image", lambda path: opened.append(str(path)) or real_open(path))
    result = trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(data), train_epochs=3,
                         save_every_n_epochs=1, train_iterations=999, save_lora_name="ep", effect_check=False)
    # 2 images x 3 repeats + 2 x 1 = 8 samples per epoch, batch 2 -> 4 batches; 3 epochs -> 12 steps
    assert result["status"] == "done" and result["steps"] == 12
    assert [int(r["step"]) for r in result["history"].rows] == list(range(1, 13))
    assert len(opened) == 4  # the folder is planned once: the step count's plan is the one trained on
    lines = [m.text for m in result["history"].messages]
    assert "12 steps = 3 epochs × 4 batches (8 samples from 4 images (repeats 1–3) / batch 2)" in lines
    assert [epochs.by_step[k] for k in (1, 4, 5, 8, 9, 12)] == [(1, 3), (1, 3), (2, 3), (2, 3), (3, 3), (3, 3)]
    names = sorted(p.split("/")[-1] for p in result["files"] if p.endswith(".safetensors"))
    assert names == ["ep.safetensors", "ep_epoch1.safetensors", "ep_epoch2.safetensors"]
    _, meta = load_lora(result["lora_path"])
    assert meta["ss_num_epochs"] == "3" and meta["ss_num_batches_per_epoch"] == "4" and meta["ss_steps"] == "12"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks cat": {"n_repeats": 3, "img_count": 2},
                                                   "1_dog": {"n_repeats": 1, "img_count": 2}}


def test_count_steps_cli_prints_the_plan_without_training(tmp_path, capsys):
    from trainer.__main__ import main

    data = kohya_folder(tmp_path / "data")
    code = main(["train", "--mode", "LoRA", "--set", f"lora_data_directory={data}", "--set", "train_epochs=10",
                 "--set", "train_batch_size=1", "--set", "image_size(height, width)=64", "--set", "image_buckets_step=32",
                 "--set", "image_min_length=32", "--count-steps", "--lora-dir", str(tmp_path / "out")])
    assert code == 0
    assert capsys.readouterr().out.strip() == "80 steps = 10 epochs × 8 batches (8 samples from 4 images (repeats 1–3) / batch 1)"
    assert not (tmp_path / "out").exists()
    assert main(["train", "--mode", "LoRA", "--set", f"lora_data_directory={tmp_path / 'nope'}", "--count-steps"]) == 2
    assert "lora_data_directory" in capsys.readouterr().err


def test_uncaptioned_images_in_kohya_folders_are_captioned_with_the_folder_class(tmp_path):
    from trainer.modes.dataset import plan_lora_data
    from trainer.settings import Settings

    data = kohya_folder(tmp_path / "data", captions=False)
    s = Settings.from_layers({"lora_data_directory": str(data), "lora_trigger_word": "ohwx",
                              "image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32})
    captions = {x.path.name: x.caption for x in plan_lora_data(s).samples}
    assert captions == {"cat0.png": "ohwx, sks cat", "cat1.png": "ohwx, sks cat", "dog0.png": "ohwx, dog",
                        "dog1.png": "ohwx, dog"}


# -- captions --------------------------------------------------------------------------------------


def _record_prompts(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    original = DiffusersBundle.encode_prompts

    def spy(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(DiffusersBundle, "encode_prompts", spy)
    return calls


def test_caption_controls_shape_what_the_text_encoder_sees(trainer, image_folder, monkeypatch):
    for i, path in enumerate(sorted(image_folder.glob("*.txt"))):
        path.write_text(f"kept{i}, red, square, round, big", encoding="utf-8")
    calls = _record_prompts(monkeypatch)
    runs = []
    for seed in (0, 0, 1):
        calls.clear()
        trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(image_folder), lora_trigger_word="sks",
                    shuffle_caption=True, keep_tokens=1, train_batch_size=1, train_iterations=12, train_seed=seed,
                    effect_check=False, save_lora_name=f"cap{len(runs)}")
        runs.append([c[0] for c in calls])
    fed = runs[0]
    assert len(fed) == 12  # one encoder call per step: shuffled captions cannot be cached
    for caption in fed:
        tags = caption.split(", ")
        assert tags[0] == "sks" and tags[1].startswith("kept")  # trigger first, then the kept tag
        assert sorted(tags[2:]) == ["big", "red", "round", "square"]  # shuffled, nothing dropped
    per_image: dict[str, set[str]] = {}
    for caption in fed:
        per_image.setdefault(caption.split(", ")[1], set()).add(caption)
    assert any(len(orders) > 1 for orders in per_image.values())  # the same image is seen in new orders
    assert runs[1] == fed and runs[2] != fed  # deterministic under the run's seed


def test_caption_dropout_feeds_empty_captions_at_the_rate_from_cached_encodings(trainer, image_folder, monkeypatch):
    calls = _record_prompts(monkeypatch)
    from trainer.modes import setup

    fed: list[str] = []
    original = setup.CaptionEncoder.__call__

    def spy(self, captions, step):
        fed.extend(self.augment(c, step, slot) for slot, c in enumerate(captions))
        return original(self, captions, step)

    monkeypatch.setattr(setup.CaptionEncoder, "__call__", spy)
    trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(image_folder), caption_dropout_rate=0.5,
                train_iterations=40, effect_check=False, save_lora_name="drop", **UNET_ONLY)
    assert len(calls) == 1 and "" in calls[0]  # one up-front encoding, the empty caption included
    empty = sum(1 for c in fed if c == "") / len(fed)
    assert 0.3 < empty < 0.7 and set(fed) == {"", "a shape"}


def test_caption_augment_rates_keep_and_trigger():
    from trainer.data import CaptionAugment

    aug = CaptionAugment(trigger="sks", keep_tokens=1, tag_dropout_rate=0.25, shuffle=True, seed=3)
    caption = "sks, name, a, b, c, d, e, f, g, h"
    out = [aug(caption, step) for step in range(2000)]
    assert all(c.startswith("sks, name") for c in out)
    kept = sum(len(c.split(", ")) - 2 for c in out) / (8 * len(out))
    assert 0.72 < kept < 0.78  # 25 % of the free tags dropped
    assert out == [aug(caption, step) for step in range(2000)]
    assert CaptionAugment(dropout_rate=1.0)("x, y", 0) == "" and not CaptionAugment().active


# -- masked loss -----------------------------------------------------------------------------------


def _grad_of_predictions(monkeypatch) -> list[torch.Tensor]:
    grads: list[torch.Tensor] = []
    original = DiffusersBundle.predict

    def spy(self, noisy, t, cond):
        out = original(self, noisy, t, cond)
        if out.requires_grad:
            out.register_hook(lambda g: grads.append(g.detach().clone()))
        return out

    monkeypatch.setattr(DiffusersBundle, "predict", spy)
    return grads


@pytest.mark.parametrize("kind", ["mask_file", "alpha"])
def test_masked_loss_gives_no_gradient_from_outside_the_mask(kind, trainer, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    image = draw_image(data / "x.png", (200, 40, 40))
    if kind == "mask_file":
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # left half learns (latent columns 0-3)
        mask.save(data / "x_mask.png")
    else:
        rgba = Image.open(image).convert("RGBA")
        alpha = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(alpha).rectangle((0, 0, 31, 63), fill=255)
        rgba.putalpha(alpha)
        rgba.save(image)
    grads = _grad_of_predictions(monkeypatch)
    result = trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(data), masked_loss=True,
                         train_batch_size=1, train_iterations=3, effect_check=False, save_lora_name=f"mask_{kind}")
    assert result["status"] == "done" and len(grads) == 3
    for g in grads:
        assert g[..., 4:].abs().max() == 0  # outside the mask: nothing flows back
        assert g[..., :4].abs().min() > 0
    _, meta = load_lora(result["lora_path"])
    assert meta["ss_masked_loss"] == "True"
    if kind == "mask_file":
        assert result["steps"] == 3  # the mask file is no training image: one image, batch 1


def test_without_masked_loss_a_mask_file_is_an_image_and_the_gradient_is_everywhere(trainer, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    draw_image(data / "x.png", (200, 40, 40))
    Image.new("L", (64, 64), 0).save(data / "x_mask.png")
    grads = _grad_of_predictions(monkeypatch)
    result = trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(data), train_batch_size=1,
                         train_iterations=2, effect_check=False, save_lora_name="nomask")
    assert "1 images" not in " ".join(m.text for m in result["history"].messages)
    assert all(g.abs().min() > 0 for g in grads)


def test_a_mask_of_another_size_is_resized_with_a_note(trainer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    draw_image(data / "x.png", (200, 40, 40))
    Image.new("L", (32, 32), 255).save(data / "x_mask.png")
    result = trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(data), masked_loss=True,
                         train_batch_size=1, train_iterations=1, effect_check=False, save_lora_name="resized")
    assert result["status"] == "done"
    assert any("x_mask.png is 32x32 but x.png is 64x64; the mask is resized" in n for n in result["notes"])


# -- noise and min-SNR -----------------------------------------------------------------------------


def test_noise_controls_off_draw_plain_noise_and_on_shift_and_colour_it():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    shape = (64, 4, 16, 16)
    plain = torch.randn(shape, generator=gen())
    assert torch.equal(NoiseControls().draw(shape, gen(), torch.device("cpu")), plain)
    shifted = NoiseControls(offset=0.5).draw(shape, gen(), torch.device("cpu"))
    offsets = (shifted - plain).mean(dim=(2, 3))
    assert torch.allclose(shifted - plain, offsets[..., None, None].expand(shape), atol=1e-6)  # one per channel
    assert 0.4 < float(offsets.std()) < 0.6
    pyramid = NoiseControls(multires_iterations=6, multires_discount=0.5).draw(shape, gen(), torch.device("cpu"))
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-3)

    def coarse_energy(x):  # variance of 8x8-pooled noise: white noise has 1/64, pyramid noise far more
        return float(torch.nn.functional.avg_pool2d(x, 8).var())

    assert coarse_energy(pyramid) > 2.5 * coarse_energy(plain)


@pytest.mark.parametrize("mode", ["LoRA", "ADDifT", "Multi-ADDifT", "Difference"])
def test_noise_and_min_snr_reach_every_noised_mode(mode, trainer, image_folder, image_pair, tmp_path, monkeypatch):
    seen: list[tuple[float, int]] = []
    original = NoiseControls.draw

    def spy(self, *args, **kwargs):
        seen.append((self.offset, self.multires_iterations))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NoiseControls, "draw", spy)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(2):
        draw_image(pairs / f"p{i}.png", (200, 40, 40), box=(8 + 8 * i, 8, 40, 40))
        draw_image(pairs / f"p{i}_after.png", (40, 40, 200), box=(8 + 8 * i, 8, 40, 40))
    inputs = {"LoRA": {"lora_data_directory": str(image_folder)},
              "Multi-ADDifT": {"lora_data_directory": str(pairs), "diff_target_name": "_after"},
              "ADDifT": {"original image": str(image_pair[0]), "target image": str(image_pair[1])},
              "Difference": {"original image": str(image_pair[0]), "target image": str(image_pair[1])}}[mode]
    common = dict(mode=mode, model="tiny-sd1", train_iterations=4, effect_check=False, train_learning_rate="1e-3",
                  **inputs)
    base = trainer.run(save_lora_name="base", **common)
    noisy = trainer.run(save_lora_name="noisy", noise_offset=0.1, multires_noise_iterations=3, **common)
    snr = trainer.run(save_lora_name="snr", train_snr_gamma=1.0, **common)
    assert (0.1, 3) in seen
    a, b, c = (load_lora(r["lora_path"])[0] for r in (base, noisy, snr))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the noise controls changed what was learned
    assert any(not torch.equal(a[k], c[k]) for k in a)  # so did min-SNR weighting
    assert load_lora(noisy["lora_path"])[1]["ss_noise_offset"] == "0.1"


def test_difference_pass_2_draws_noise_with_its_own_settings(trainer, image_pair, monkeypatch):
    seen: list[float] = []
    original = NoiseControls.draw

    def spy(self, *args, **kwargs):
        seen.append(self.offset)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NoiseControls, "draw", spy)
    result = trainer.run(mode="Difference", model="tiny-sd1", train_iterations=2, effect_check=False,
                         noise_offset=0.05, save_lora_name="diff2", **{"original image": str(image_pair[0]),
                         "target image": str(image_pair[1]), "2nd pass": {"use_2nd_pass_settings": True,
                         "noise_offset": 0.2, "train_iterations": 3}})
    assert result["status"] == "done" and seen == [0.05] * 2 + [0.2] * 3


@pytest.mark.parametrize("v_pred", [False, True])
def test_min_snr_weights_follow_the_formula_from_alphas_cumprod(v_pred):
    from trainer.modes.common import DenoiseLoss, NoiseSchedule

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    loss = DenoiseLoss("MSE", 5.0, v_pred, NoiseSchedule(alphas))
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    snr = alphas[t] / (1 - alphas[t])
    want = [min(float(s), 5.0) / (float(s) + 1) if v_pred else min(5.0 / float(s), 1.0) for s in snr]
    assert loss.weights(t).tolist() == pytest.approx(want, rel=1e-5)
    # and the weight scales each sample's loss
    pred, target = torch.zeros(6, 4, 2, 2), torch.ones(6, 4, 2, 2)
    assert float(loss(pred, target, t)) == pytest.approx(sum(want) / 6, rel=1e-5)


# -- regularization --------------------------------------------------------------------------------


def _fit_base_to(images, tmp_path) -> str:
    """tiny-sd1 fully fine-tuned on ``images`` under 'a shape', written as a single-file checkpoint:
    a base model that already knows the class, as a real base does."""
    from trainer.models.checkpoint import save_single_file
    from trainer.models.diffusers_runtime import load_bundle
    from trainer.modes.common import NoiseSchedule

    from .test_lora_mode import _pixels

    bundle = load_bundle("tiny-sd1", device="cpu")
    latents = torch.cat([bundle.encode_images(_pixels(p)[None], torch.Generator().manual_seed(0)) for p in images])
    cond = bundle.encode_prompts(["a shape"] * len(images))
    sched, gen = NoiseSchedule(bundle.alphas_cumprod), torch.Generator().manual_seed(0)
    unet = bundle.unet
    unet.requires_grad_(True)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(150):
        eps = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
        loss = torch.nn.functional.mse_loss(bundle.predict(sched.add_noise(latents, eps, t), t, cond), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.requires_grad_(False)
    return str(save_single_file(bundle.components, tmp_path / "class_base.safetensors"))


def test_regularization_keeps_the_class_near_the_base(trainer, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    reg_images = [draw_image(reg / f"r{i}.png", (40, 60 + 50 * i, 220), box=(10 + 4 * i, 10, 50, 46), shape="ellipse")
                  for i in range(3)]
    for p in reg_images:
        p.with_suffix(".txt").write_text("a shape", encoding="utf-8")
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        draw_image(train / f"t{i}.png", (230, 30 + 40 * i, 30), box=(4, 4 + 6 * i, 60, 40))
        (train / f"t{i}.txt").write_text("sks, a shape", encoding="utf-8")
    model = _fit_base_to(reg_images, tmp_path)
    # SGD: Adam moves every weight by ~lr per step whatever the gradient, and in 40 steps that random walk,
    # not the loss, dominates the drift; with SGD the reg gradient's pull is what is measured
    common = dict(mode="LoRA", model=model, lora_data_directory=str(train), train_iterations=40, train_batch_size=2,
                  train_optimizer="SGDNesterov", train_learning_rate="3.0", effect_check=False)
    plain = trainer.run(save_lora_name="plain", **common)
    kept = trainer.run(save_lora_name="kept", reg_data_directory=str(reg), prior_loss_weight=1.0, **common)
    _, meta = load_lora(kept["lora_path"])
    assert meta["ss_num_reg_images"] == "3" and meta["ss_num_train_images"] == "3"

    from trainer.models.diffusers_runtime import load_bundle
    from trainer.modes.common import NoiseSchedule
    from trainer.network import network_from_file

    from .test_lora_mode import _pixels

    base = load_bundle(model, device="cpu")
    latents = torch.cat([base.encode_images(_pixels(p)[None], torch.Generator().manual_seed(1)) for p in reg_images])
    cond = base.encode_prompts(["a shape"] * len(reg_images))
    sched = NoiseSchedule(base.alphas_cumprod)

    def drift(path: str) -> float:
        """Mean squared change of the prediction on the reg images (and their denoising loss), held-out
        noise and timesteps."""
        network = network_from_file(base, path)
        total = loss = 0.0
        for seed in range(6):
            g = torch.Generator().manual_seed(100 + seed)
            eps = torch.randn(latents.shape, generator=g)
            t = torch.randint(100, 900, (latents.shape[0],), generator=g)
            noisy = sched.add_noise(latents, eps, t)
            with torch.no_grad():
                before = base.predict(noisy, t, cond)
                network.attach()
                try:
                    after = base.predict(noisy, t, cond)
                finally:
                    network.detach()
            total += float((after - before).pow(2).mean())
            loss += float((after - eps).pow(2).mean())
        return total / 6, loss / 6

    (without, loss_without), (with_reg, loss_with) = drift(plain["lora_path"]), drift(kept["lora_path"])
    assert with_reg < 0.75 * without, (with_reg, without)  # measured: 0.0088 vs 0.0150
    assert loss_with < loss_without  # and the class is still denoised as well as the base did


def test_reg_batches_mix_one_reg_sample_per_training_sample_each_epoch(tmp_path):
    from trainer.data import BucketBatcher, planned_counts
    from trainer.modes.dataset import plan_lora_data
    from trainer.settings import Settings

    data = kohya_folder(tmp_path / "data")
    reg = tmp_path / "reg" / "1_thing"
    reg.mkdir(parents=True)
    for i in range(3):
        draw_image(reg / f"r{i}.png", (40, 40, 40 + 60 * i))
    s = Settings.from_layers({"lora_data_directory": str(data), "reg_data_directory": str(tmp_path / "reg"),
                              "image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32,
                              "lora_trigger_word": "sks"})
    plan = plan_lora_data(s)
    counts = planned_counts(plan)
    batcher = BucketBatcher(counts, 2, seed=0)
    samples = counts.buckets[0].samples
    for _epoch in range(3):
        seen = [samples[i] for _ in range(batcher.batches_per_epoch) for i in next(batcher).indices]
        train = [x.path.name for x in seen if not x.is_reg]
        regs = [x for x in seen if x.is_reg]
        assert sorted(train) == sorted(["cat0.png"] * 3 + ["cat1.png"] * 3 + ["dog0.png", "dog1.png"])
        assert len(regs) == len(train) == 8  # one reg sample per training sample
        assert {x.path.name for x in regs} == {"r0.png", "r1.png", "r2.png"}  # every reg image is used
        assert all(x.caption == "thing" for x in regs)  # reg captions: the class, never the trigger word


def test_missing_reg_folder_is_one_clear_line(trainer, image_folder, tmp_path):
    from trainer.errors import ValidationError

    with pytest.raises(ValidationError) as err:
        trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(image_folder),
                    reg_data_directory=str(tmp_path / "nope"), save_lora_name="x")
    assert "reg_data_directory" in str(err.value) and "does not exist" in str(err.value)
