"""ADDifT inputs and options end to end: the difference mask of a thin change, an empty mask, no reverse pass."""

from __future__ import annotations

import pytest
from PIL import Image

from trainer.errors import InputError
from trainer.network import load_lora


def _line_pair(tmp_path, width_px=2):
    base = Image.new("RGB", (64, 64), (90, 110, 130))
    base.save(tmp_path / "orig.png")
    changed = base.copy()
    for x in range(13, 13 + width_px):  # off the 8 px latent grid
        for y in range(8, 56):
            changed.putpixel((x, y), (250, 250, 250))
    changed.save(tmp_path / "targ.png")
    return tmp_path / "orig.png", tmp_path / "targ.png"


def _run(trainer, orig, targ, **values):
    return trainer.run(mode="ADDifT", model="tiny-sd1", save_lora_name="addift", train_iterations=4,
                       train_learning_rate="1e-3", train_batch_size=1, train_min_timesteps=200, train_max_timesteps=800,
                       **{"original image": str(orig), "target image": str(targ)}, **values)


def test_a_thin_change_trains_with_the_diff_mask(trainer, tmp_path):
    # nearest-resizing the mask kept one pixel per 8x8 cell: a 2 px line gave loss 0 and an unchanged LoRA
    orig, targ = _line_pair(tmp_path)
    result = _run(trainer, orig, targ, diff_use_diff_mask=True)
    assert result["status"] == "done" and result["final_loss"] > 1e-6
    ups = [v for k, v in load_lora(result["lora_path"])[0].items() if k.endswith("lora_up.weight")]
    assert max(float(u.abs().max()) for u in ups) > 1e-6  # the adapters moved from their zero init


def test_an_identical_pair_with_the_diff_mask_is_refused_naming_the_pair(trainer, tmp_path):
    orig, _ = _line_pair(tmp_path)
    same = tmp_path / "same.png"
    Image.open(orig).save(same)
    with pytest.raises(InputError, match="do not differ") as err:
        _run(trainer, orig, same, diff_use_diff_mask=True)
    assert "orig.png" in str(err.value) and "same.png" in str(err.value) and "diff_use_diff_mask" in str(err.value)
    assert not list(trainer.lora_dir.glob("*.safetensors"))


def test_alt_ratio_zero_means_no_reverse_pass(trainer, image_pair, monkeypatch):
    import trainer.modes.addift as addift

    multipliers = []  # what the loss steps ask network.scaled() for

    def spy_loss(ctx, s, network, draw):
        original = network.scaled

        def recording(m):
            multipliers.append(m)
            return original(m)

        network.scaled = recording
        return real_loss(ctx, s, network, draw)

    real_loss = addift.addift_loss
    monkeypatch.setattr(addift, "addift_loss", spy_loss)
    result = _run(trainer, *image_pair, diff_alt_ratio=0)  # crashed on step 2: nothing had a gradient
    assert result["status"] == "done" and result["steps"] == 4 and result["final_loss"] > 0
    trained = [m for m in multipliers if m != 0.0][:4]  # (the effect check after training asks for 1.0)
    assert trained == [addift.TRAIN_MULTIPLIER] * 4  # every step a forward step, at +0.25


def test_multi_addift_refuses_a_pair_that_does_not_differ(trainer, tmp_path):
    from .conftest import draw_image

    folder = tmp_path / "pairs"
    folder.mkdir()
    draw_image(folder / "a.png", (200, 40, 40))
    draw_image(folder / "a_after.png", (40, 60, 230))
    draw_image(folder / "b.png", (90, 90, 90))
    draw_image(folder / "b_after.png", (90, 90, 90))  # the same picture
    with pytest.raises(InputError, match="do not differ") as err:
        trainer.run(mode="Multi-ADDifT", model="tiny-sd1", save_lora_name="multi", train_iterations=1,
                    lora_data_directory=str(folder), diff_target_name="_after", diff_use_diff_mask=True)
    assert "b.png" in str(err.value) and "b_after.png" in str(err.value) and "/a.png" not in str(err.value)
