"""Training from every model variant through the real CLI: one LoRA step each; the saved LoRA loads in
diffusers (``load_lora_weights``) with every module matched, maps onto the model with no unmatched key,
and has the key set of a LoRA trained on the built-in model (whose layout the kohya checks in
tests/network cover). The same weights as a diffusers folder and as a single file train the same LoRA."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from model_variants import civitai_file, small_vocab_components, small_vocab_folder
from PIL import Image
from safetensors.torch import save_file

from trainer.__main__ import main
from trainer.check import check_lora
from trainer.models.checkpoint import save_diffusers_folder
from trainer.models.diffusers_runtime import load_bundle
from trainer.models.ldm import vae_to_ldm
from trainer.models.tiny import build_builtin
from trainer.network import load_lora

peft = pytest.importorskip("peft")
PRESETS = Path(__file__).resolve().parents[2] / "presets"


# Two runs of the same training agree to float noise, not bit for bit: the folder and the single file hold
# the same values in differently laid-out tensors, so kernels round differently, and Adam's normalised step
# turns a near-zero gradient's rounding into a visible move of that element (up to 1.5e-5 of 3e-4 after 3
# steps on one x86 CPU). Measured (tiny-sd1 / tiny-sdxl): folder vs single file 2.9e-5 / 2.6e-5; the same
# file trained without its zero-terminal-SNR key 0.15 / 0.13; train_snr_gamma +1% 9e-4.
SAME_LORA_TOL = 5e-3


def trained_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over the ``lora_up`` tensors: they start at zero, so all they hold was trained (the
    ``lora_down`` init would dilute the measure)."""
    keys = [k for k in b if "lora_up" in k]
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    norm = sum(float((b[k].double() ** 2).sum()) for k in keys)
    return (diff / max(norm, 1e-300)) ** 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 60 * i, 40)).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text("the cat", encoding="utf-8")
    return folder


def train(model: str, out: Path, data: Path, *, mode: str = "LoRA", steps: int = 1, vae: str = "",
          extra: tuple[str, ...] = ()) -> Path:
    """One CLI run; returns the saved LoRA."""
    args = ["train", str(PRESETS / f"{mode}.json"), "--model", model, "--lora-dir", str(out), "--quiet",
            "--logs-dir", str(out / "logs"), "--json-dir", str(out / "json"),
            "--set", "image_size(height, width)=64", "--set", "image_buckets_step=32", "--set", "image_min_length=32",
            "--set", f"train_iterations={steps}", "--set", "train_batch_size=1", "--set", "save_lora_name=v",
            "--set", "train_seed=3", "--set", "train_model_precision=fp32", "--set", "save_precision=fp32",
            "--set", "save_overwrite=true", "--set", "train_lr_scheduler=constant", "--set", "logging_save_csv=false",
            "--result-json", str(out / "result.json")]
    if mode == "LoRA":
        args += ["--set", f"lora_data_directory={data}"]
    else:
        args += ["--original-prompt", "the cat", "--target-prompt", "a dog"]
    if vae:
        args += ["--vae", vae]
    assert main(args + list(extra)) == 0
    import json

    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == steps
    return Path(result["lora_path"])


def _pipeline(bundle):
    """A diffusers pipeline over copies of the bundle's parts (its tokenizers included)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {"vae": copy.deepcopy(bundle.vae), "unet": copy.deepcopy(bundle.unet), "scheduler": DDPMScheduler(clip_sample=False)}
    tes = [copy.deepcopy(te) for te in bundle.text_encoders.values()]
    if len(tes) == 2:
        return StableDiffusionXLPipeline(text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=bundle.tokenizers[0],
                                         tokenizer_2=bundle.tokenizers[1], **parts)
    return StableDiffusionPipeline(text_encoder=tes[0], tokenizer=bundle.tokenizers[0], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)


def assert_loads_everywhere(lora: Path, bundle, reference_keys: set[str] | None = None) -> None:
    """diffusers ``load_lora_weights`` matches every module; our own check finds no unmatched key."""
    state, _ = load_lora(lora)
    modules = {k.partition(".")[0] for k in state}
    pipe = _pipeline(bundle)
    # folder + weight_name: diffusers < 0.32 refuses a bare file path offline
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name, adapter_name="ours")
    roots = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    layers = sum(1 for root in roots for m in root.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert layers == len(modules) > 0, f"diffusers matched {layers} of {len(modules)} modules"
    report = check_lora(lora, bundle, size_px=64)
    assert report["unmatched"] == [] and report["matched"] == report["modules_in_file"]
    if reference_keys is not None:
        assert set(state) == reference_keys


@pytest.fixture(scope="module")
def builtin_keys(tmp_path_factory, data) -> dict[str, set[str]]:
    out = tmp_path_factory.mktemp("builtin")
    return {name: set(load_lora(train(name, out / name, data))[0]) for name in ("tiny-sd1", "tiny-sdxl")}


@pytest.mark.parametrize("mode", ["LoRA", "iLECO"])
def test_folder_with_its_own_tokenizer_trains(mode, tmp_path, data, builtin_keys) -> None:
    folder = small_vocab_folder(tmp_path)
    lora = train(str(folder), tmp_path / "out", data, mode=mode)
    bundle = load_bundle(str(folder), device="cpu")
    assert len(bundle.tokenizers[0]) == 64
    assert_loads_everywhere(lora, bundle, builtin_keys["tiny-sd1"] if mode == "LoRA" else None)


VARIANTS = {
    "fp16": ("tiny-sdxl", {"dtype": torch.float16}, ()),
    "bf16": ("tiny-sd1", {"dtype": torch.bfloat16}, ()),
    "ema": ("tiny-sd1", {"ema": True}, ()),
    "ema-used": ("tiny-sd1", {"ema": True}, ("--set", "model_use_ema=true")),
    "v+ztsnr": ("tiny-sdxl", {"markers": ("v_pred", "ztsnr")}, ()),
    "old-prefix-no-vae": ("tiny-sd1", {"old_clip_prefix": True, "no_vae": True}, ()),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_variants_train(variant, tmp_path, data, builtin_keys) -> None:
    base, kwargs, extra = VARIANTS[variant]
    parts = build_builtin(base)
    path = civitai_file(parts, tmp_path / f"{variant}.safetensors", **kwargs)
    vae = ""
    if kwargs.get("no_vae"):
        vae = str(tmp_path / "sd1.vae.safetensors")
        save_file(vae_to_ldm(parts.vae.state_dict(), dict(parts.vae.config)), vae)
    lora = train(str(path), tmp_path / "out", data, vae=vae, extra=extra)
    bundle = load_bundle(str(path), vae or None, device="cpu", use_ema="model_use_ema=true" in extra)
    assert_loads_everywhere(lora, bundle, builtin_keys[base])


def test_yaml_v_pred_checkpoint_trains_ileco(tmp_path, data) -> None:
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "vmodel.safetensors")
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    lora = train(str(path), tmp_path / "out", data, mode="iLECO")
    _, metadata = load_lora(lora)
    assert metadata["ss_v2"] == "False" and metadata.get("modelspec.prediction_type") == "v"
    assert_loads_everywhere(lora, load_bundle(str(path), device="cpu"))


def test_ema_choice_changes_what_is_trained(tmp_path, data) -> None:
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "ema.safetensors", ema=True)
    regular = load_lora(train(str(path), tmp_path / "a", data, steps=2))[0]
    ema = load_lora(train(str(path), tmp_path / "b", data, steps=2, extra=("--set", "model_use_ema=true")))[0]
    assert regular.keys() == ema.keys()
    assert trained_distance(regular, ema) > 100 * SAME_LORA_TOL


@pytest.mark.parametrize("base", ["tiny-sd1", "tiny-sdxl"])
def test_folder_and_single_file_train_the_same_lora(base, tmp_path, data) -> None:
    """Same weights, same schedule (v-prediction, zero-terminal SNR): from the folder's scheduler
    config on one side, from the file's v_pred/ztsnr keys on the other."""
    parts = build_builtin(base)
    parts.v_pred = True
    parts.scheduler = {**parts.scheduler, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    folder = save_diffusers_folder(parts, tmp_path / "folder")
    single = civitai_file(parts, tmp_path / "single.safetensors", markers=("v_pred", "ztsnr"))
    a = load_lora(train(str(folder), tmp_path / "a", data, steps=3))[0]
    b = load_lora(train(str(single), tmp_path / "b", data, steps=3))[0]
    assert a.keys() == b.keys()
    assert max(v.abs().max().item() for k, v in a.items() if "lora_up" in k) > 0  # it trained
    assert trained_distance(a, b) <= SAME_LORA_TOL
    if base == "tiny-sd1":  # the tolerance still sees the schedule: the file without its ztsnr key trains apart
        plain = civitai_file(parts, tmp_path / "plain.safetensors", markers=("v_pred",))
        c = load_lora(train(str(plain), tmp_path / "c", data, steps=3))[0]
        assert trained_distance(c, b) > 10 * SAME_LORA_TOL


def test_small_vocab_single_file_has_no_tokenizer_and_says_so(tmp_path) -> None:
    from trainer.errors import InputError

    path = civitai_file(small_vocab_components(tmp_path), tmp_path / "small.safetensors")
    with pytest.raises(InputError, match="brings no tokenizer of its own: use its diffusers folder"):
        load_bundle(str(path), device="cpu")
