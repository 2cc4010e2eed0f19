"""Catalogue, part 2: bad data, bad files and odd settings that only show once a job runs.

Every case goes through ``trainer.runner.run_job`` on the built-in ``tiny-sd1`` (64 px, batch 1, 2 steps,
fp32, CPU) with one shared host, so the model is built once. A refused case must raise a
``TrainTrainError`` whose message is one line naming the field or path and the fix, and leave no file in
the LoRA folder; an accepted case must finish and say what it skipped or changed.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainer.errors import InputError, MissingPackage, TrainTrainError

from .helpers import assert_clear, assert_no_partial, run, texts, tiny, write_image


def refused(settings, host, field: str, fix: str, kind: type = TrainTrainError) -> str:
    with pytest.raises(kind) as info:
        run(settings, host)
    message = str(info.value)
    assert_clear(message, field, fix)
    assert_no_partial(host.lora_dir())
    assert not list(host.lora_dir().glob("*.safetensors")), "a refused job wrote a LoRA"
    return message


# -- the data folder -----------------------------------------------------------------------------


def test_missing_data_folder(host, tmp_path):
    refused(tiny(lora_data_directory=str(tmp_path / "nope")), host, "lora_data_directory", "check the path", InputError)


def test_data_folder_is_a_file(host, tmp_path):
    f = tmp_path / "file.png"
    write_image(f)
    refused(tiny(lora_data_directory=str(f)), host, "lora_data_directory", "give the folder holding the images")


def test_image_less_data_folder(host, tmp_path):
    folder = tmp_path / "captions_only"
    folder.mkdir()
    (folder / "a.txt").write_text("a caption")
    (folder / "notes.md").write_text("# not an image")
    refused(tiny(lora_data_directory=str(folder)), host, "lora_data_directory", "add files ending in")


def test_only_unreadable_images(host, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "noise.jpg").write_bytes(os.urandom(300))
    refused(tiny(lora_data_directory=str(folder)), host, "lora_data_directory", "fix or remove those files")


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory, dataset) -> Path:
    """The good images plus a corrupt, a truncated and a zero-byte one, and every odd PIL mode."""
    folder = tmp_path_factory.mktemp("messy") / "data"
    folder.mkdir()
    for src in dataset.iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "zero_byte.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    good = (folder / next(p.name for p in dataset.iterdir() if p.suffix == ".png")).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    write_image(folder / "cmyk.jpg", mode="CMYK", color=(10, 200, 30, 5))
    Image.fromarray((torch.arange(64 * 64).reshape(64, 64) * 15).numpy().astype("uint16"), mode="I;16").save(
        folder / "sixteen_bit.png")
    write_image(folder / "palette.png", mode="P", color=7)
    write_image(folder / "alpha.png", mode="RGBA", color=(255, 0, 0, 128))
    write_image(folder / "gray.png", mode="L", color=90)
    write_image(folder / "gray_alpha.png", mode="LA", color=(90, 200))
    write_image(folder / "odd_size.png", size=(67, 45))
    return folder


def test_bad_images_are_skipped_with_a_warning_and_odd_modes_train(host, messy_dataset):
    result, history = run(tiny(lora_data_directory=str(messy_dataset)), host)
    assert result["status"] == "done" and Path(result["lora_path"]).is_file()
    warnings = " ".join(texts(history))
    for name in ("zero_byte.png", "corrupt.png", "truncated.png"):
        assert name in warnings, f"{name} was not reported as skipped: {warnings}"
    for name in ("cmyk.jpg", "sixteen_bit.png", "palette.png", "alpha.png", "gray.png", "gray_alpha.png",
                 "odd_size.png"):
        assert name not in warnings, f"{name} should train fine: {warnings}"
    assert_no_partial(host.lora_dir())


def test_multi_addift_folder_without_pairs(host, dataset):
    settings = tiny({"mode": "Multi-ADDifT", "lora_data_directory": str(dataset), "diff_target_name": "_after",
                     "original prompt": "a photo"})
    refused(settings, host, "lora_data_directory", "named with the diff_target_name suffix '_after'", InputError)


# -- Original / Target images (ADDifT) -------------------------------------------------------------


def addift(orig: Path, targ: Path, **kw):
    return tiny({"mode": "ADDifT", "original image": str(orig), "target image": str(targ),
                 "original prompt": "a photo", **kw})


def test_original_and_target_of_different_sizes(host, tmp_path):
    o, t = write_image(tmp_path / "o.png", (64, 64)), write_image(tmp_path / "t.png", (64, 48), color=(0, 90, 0))
    refused(addift(o, t), host, "target image", "both images must have the same size", InputError)


def test_original_image_missing_file(host, tmp_path):
    t = write_image(tmp_path / "t.png")
    refused(addift(tmp_path / "gone.png", t), host, "gone.png", "re-save it or remove it")


def test_original_and_target_not_multiples_of_8_are_cropped_with_a_note(host, tmp_path):
    o = write_image(tmp_path / "o.png", (70, 66))
    t = write_image(tmp_path / "t.png", (70, 66), color=(0, 90, 0))
    result, history = run(addift(o, t), host)
    assert result["status"] == "done"
    assert any("cropped from 70x66 to 64x64" in n for n in result["notes"]), result["notes"]
    assert any("cropped" in m for m in texts(history))


# -- optimizer, scheduler, precision -----------------------------------------------------------------


def test_unknown_optimizer_argument(host, dataset):
    message = refused(tiny(lora_data_directory=str(dataset), train_optimizer_settings="wobble=1"), host,
                      "train_optimizer_settings", "wobble")
    assert any(word in message for word in ("accepted", "remove", "choose", "use ")), message


@pytest.mark.parametrize("scheduler", ["reduce_on_plateau", "one_cycle"])
def test_schedulers_that_crashed_the_reference_work(host, dataset, scheduler):
    result, _ = run(tiny(lora_data_directory=str(dataset), train_lr_scheduler=scheduler, train_iterations=3), host)
    assert result["status"] == "done" and result["steps"] == 3 and Path(result["lora_path"]).is_file()


@pytest.mark.parametrize("precision", ["model", "fp32", "bf16", "fp16", "int8"])
def test_every_model_precision(host, dataset, precision):
    settings = tiny(lora_data_directory=str(dataset), train_model_precision=precision)
    if precision == "int8" and importlib.util.find_spec("torchao") is None:
        message = refused(settings, host, "torchao", "pip install torchao", MissingPackage)
        assert "int8" in message
        return
    result, _ = run(settings, host)
    assert result["status"] == "done" and Path(result["lora_path"]).is_file()


# -- model, VAE and resume files ---------------------------------------------------------------------


def _not_a_checkpoint(folder: Path, kind: str) -> Path:
    if kind == "random bytes":
        path = folder / "random.safetensors"
        path.write_bytes(os.urandom(4096))
    elif kind == "text file":
        path = folder / "readme.ckpt"
        path.write_text("this is not a model\n")
    elif kind == "empty file":
        path = folder / "empty.safetensors"
        path.write_bytes(b"")
    elif kind == "lora file":
        path = folder / "a_lora.safetensors"
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(path),
                  metadata={"ss_network_module": "networks.lora"})
    else:  # a pickle of plain data: loads with weights_only, but holds no model
        path = folder / "numbers.ckpt"
        torch.save({"state_dict": {"x": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize("kind", ["random bytes", "text file", "empty file", "lora file", "tensor pickle"])
def test_model_file_that_is_not_a_checkpoint(host, dataset, tmp_path, kind):
    path = _not_a_checkpoint(tmp_path, kind)
    message = refused(tiny(lora_data_directory=str(dataset), model=str(path)), host, path.name, "choose")
    assert "Traceback" not in message


def _vae_state(model: str) -> dict[str, torch.Tensor]:
    from trainer.models.tiny import build_builtin

    return {k: v.contiguous() for k, v in build_builtin(model).vae.state_dict().items()}


@pytest.mark.parametrize("kind", ["wrong shape", "not a vae", "random bytes"])
def test_vae_of_the_wrong_family_or_shape(host, dataset, tmp_path, kind):
    path = tmp_path / "vae.safetensors"
    if kind == "wrong shape":
        state = _vae_state("tiny-sd1")
        name = next(k for k in state if k.endswith("conv_in.weight"))
        state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
        save_file(state, str(path))
    elif kind == "not a vae":
        save_file({"model.diffusion_model.x": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(os.urandom(1000))
    message = refused(tiny(lora_data_directory=str(dataset), vae=str(path)), host, "vae", "choose")
    assert str(path) in message or path.name in message


def test_resume_lora_of_another_family(host, dataset, tmp_path):
    path = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(32, 4)}, str(path),
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    refused(tiny(lora_data_directory=str(dataset), network_resume=str(path)), host, "network_resume",
            "choose a LoRA trained on SD1")


def test_resume_lora_that_does_not_exist(host, dataset, tmp_path):
    refused(tiny(lora_data_directory=str(dataset), network_resume=str(tmp_path / "gone.safetensors")), host,
            "gone.safetensors", "give the full path")


class _Evil:
    """Unpickling this runs ``touch`` unless the loader refuses arbitrary globals."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_model_is_refused_and_never_runs(host, dataset, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Evil(marker)}, handle)
    refused(tiny(lora_data_directory=str(dataset), model=str(path)), host, "evil.ckpt", "safetensors")
    assert not marker.exists(), "the pickle's payload ran"


@pytest.mark.parametrize("scheduler", ["one_cycle", "cyclic", "reduce_on_plateau"])
def test_momentum_cycling_schedulers_with_every_optimizer(scheduler):
    """one_cycle/cyclic cycle momentum: optimizers without it (Tiger, ...) must still run to the last step."""
    from trainer.optim import build_optimizer
    from trainer.schedules import build_scheduler
    from trainer.settings import OPTIMIZERS, SEPARATOR

    for name in (o for o in OPTIMIZERS if o != SEPARATOR):
        param = torch.nn.Parameter(torch.zeros(4))
        try:
            opt = build_optimizer(name, [{"params": [param], "name": "unet", "lr": 1e-3}], lr=1e-3, settings={},
                                  network=None, device=torch.device("cpu"))
        except MissingPackage:
            continue
        except TrainTrainError as err:  # AdamMini needs a network module; anything else is a failure
            assert "needs the network module" in str(err), err
            continue
        schedule = build_scheduler(scheduler, opt, total_steps=3, warmup_steps=0, num_cycles=1, power=1.0,
                                   step_rules="", settings={})
        for _ in range(4):  # one more than planned: the schedule must not overrun
            param.grad = torch.ones(4)
            opt.optimizer.step()
            schedule.step(1.0)
