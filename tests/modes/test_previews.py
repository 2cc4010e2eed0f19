"""Sample previews in real runs: every mode writes its images (strips for slider modes) and emits an
event, and previews do not change what is trained (same LoRA to float tolerance with and without)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.network import load_lora

PREVIEW = {"sample_every_n_steps": 2, "sample_prompts": "a shape --s 2\nred --s 1 --w 32 --d 5"}


def _inputs(mode, image_folder, image_pair, tmp_path):
    if mode == "LoRA":
        return {"lora_data_directory": str(image_folder)}
    if mode == "Multi-ADDifT":
        for path in list(image_folder.glob("*.png"))[:2]:
            Image.open(path).rotate(90).save(path.with_name(path.stem + "_t.png"))
        return {"lora_data_directory": str(image_folder), "diff_target_name": "_t"}
    if mode == "iLECO":
        return {"original prompt": "a photo", "target prompt": "red"}
    return {"original image": str(image_pair[0]), "target image": str(image_pair[1]), "original prompt": "a shape"}


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
def test_every_mode_writes_previews_and_strips(mode, trainer, image_folder, image_pair, tmp_path):
    result = trainer.run(mode=mode, model="tiny-sd1", save_lora_name=f"pv_{mode}", train_iterations=3, train_batch_size=1,
                         **PREVIEW, **_inputs(mode, image_folder, image_pair, tmp_path))
    assert result["status"] == "done"
    events = result["history"].previews
    passes = [1, 2] if mode == "Difference" else [1]
    # steps 2 and 3 (the end of the pass) for each prompt, in every pass
    assert [(e.pass_index, e.step) for e in events] == [(p, s) for p in passes for s in (2, 2, 3, 3)]
    for event in events:
        image = Image.open(event.path)
        width = 64 if event.prompt == "a shape" else 32
        assert image.size == (width * len(event.multipliers), 64)
        assert event.seconds_per_image > 0
    slider = [e for e in events if len(e.multipliers) == 3]
    assert bool(slider) == (mode != "LoRA")
    if mode == "Difference":  # the copier is previewed alone, pass 2 as the slider on top of it
        assert all(("_copy_" in e.path) == (e.pass_index == 1) for e in events)
        assert {e.multipliers for e in events if e.pass_index == 1} == {(1.0,)}
    folder = trainer.lora_dir / "samples"  # no logs folder given to run_job: beside the LoRA
    assert all(str(e.path).startswith(str(folder)) for e in events)


def test_slider_strip_moves_with_the_lora_weight(trainer, tmp_path):
    result = trainer.run(mode="iLECO", model="tiny-sd1", save_lora_name="pv_move", train_iterations=4, train_batch_size=1,
                         train_learning_rate="5e-2", sample_every_n_steps=4, sample_prompts="a photo --s 3 --l 1",
                         **{"original prompt": "a photo", "target prompt": "red"})
    [event] = result["history"].previews
    image = torch.from_numpy(np.asarray(Image.open(event.path), dtype=np.float32))
    assert image.shape == (64, 192, 3)
    left, middle, right = image[:, :64], image[:, 64:128], image[:, 128:]
    assert (left - middle).abs().mean() > 1 and (right - middle).abs().mean() > 1  # −1 and +1 differ from 0
    assert (left - right).abs().mean() > 1


def _tensors(path):
    state, _ = load_lora(path)
    return state


@pytest.mark.parametrize("mode", ["LoRA", "iLECO"])
def test_previews_do_not_perturb_training(mode, trainer, image_folder):
    inputs = {"lora_data_directory": str(image_folder)} if mode == "LoRA" else {"original prompt": "a photo",
                                                                               "target prompt": "red"}
    common = dict(mode=mode, model="tiny-sd1", train_iterations=20, train_batch_size=1, train_learning_rate="1e-2",
                  use_gradient_checkpointing=True, **inputs)
    plain = trainer.run(save_lora_name=f"plain_{mode}", **common)
    previewed = trainer.run(save_lora_name=f"pv_{mode}", sample_every_n_steps=10,
                            sample_prompts="a photo --s 2\nred --s 2 --d 9", **common)
    assert len(previewed["history"].previews) == 4 and not plain["history"].previews
    a, b = _tensors(plain["lora_path"]), _tensors(previewed["lora_path"])
    assert a.keys() == b.keys()
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))  # it did train: a real comparison
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [r["loss"] for r in plain["history"].rows] == pytest.approx([r["loss"] for r in previewed["history"].rows],
                                                                       abs=1e-6)


def test_schedule_free_previews_render_the_averaged_weights(trainer, image_folder, monkeypatch):
    """A schedule-free optimizer holds its averaged weights (what saves write) only in eval mode: every
    preview must render in eval mode and training must go on in train mode."""
    import trainer.optim as optim
    from trainer.sampling.hook import PreviewHook

    class FakeScheduleFree(torch.optim.SGD):  # train()/eval() make it schedule-free to the trainer
        mode = "train"

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

        def step(self, closure=None):
            assert self.mode == "train", "a training step ran on the averaged weights"
            return super().step(closure)

    made: list[FakeScheduleFree] = []

    def build(name, groups, **kwargs):
        made.append(FakeScheduleFree(groups, lr=1e-3))
        return optim.OptimizerBundle(made[-1], schedule_free=True)

    monkeypatch.setattr(optim, "build_optimizer", build)
    modes_seen: list[str] = []
    original = PreviewHook._at
    monkeypatch.setattr(PreviewHook, "_at", lambda self, m, p: modes_seen.append(made[-1].mode) or original(self, m, p))
    result = trainer.run(mode="LoRA", model="tiny-sd1", lora_data_directory=str(image_folder), save_lora_name="sf",
                         train_iterations=3, train_batch_size=1, effect_check=False, sample_every_n_steps=2,
                         sample_prompts="a shape --s 1 --w 32 --h 32")
    assert result["status"] == "done" and len(modes_seen) == 2  # steps 2 and 3
    assert set(modes_seen) == {"eval"}
