"""Loading what users have on disk: diffusers folders with their own tokenizer and scheduler, fp16/bf16,
pruned/EMA single files, old CLIP prefixes, no baked VAE, v-prediction and zero-SNR markers, and the
one-line refusals of families we do not train. Training from each variant is in test_variant_training.py."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from model_variants import SMALL_VOCAB, civitai_file, ema_weights, read_file, small_vocab_folder
from safetensors.torch import save_file

from trainer.errors import InputError
from trainer.hosts.standalone import StandaloneHost
from trainer.models.bundle import Family
from trainer.models.checkpoint import save_diffusers_folder, save_single_file
from trainer.models.components import compute_alphas_cumprod
from trainer.models.diffusers_runtime import load_bundle
from trainer.models.ldm import vae_to_ldm
from trainer.models.tiny import build_builtin
from trainer.models.tokenizer import tiny_vocab_size


def _unet_ldm(bundle) -> dict[str, torch.Tensor]:
    from trainer.models.ldm import unet_to_ldm

    return unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return small_vocab_folder(tmp_path_factory.mktemp("folder"))


def test_diffusers_folder_uses_its_own_tokenizer_and_scheduler(folder) -> None:
    from diffusers import DDPMScheduler

    assert SMALL_VOCAB < tiny_vocab_size()  # the built-in tokenizer could not drive this encoder
    bundle = load_bundle(str(folder), device="cpu")
    tok = bundle.tokenizers[0]
    assert len(tok) == SMALL_VOCAB and tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77
    ids = bundle._chunk_ids(tok, ["the cat"])[0].tolist()
    assert ids == [62, 53, 55, 63] + [63] * 73  # BOS, "the</w>", "cat</w>" (the folder's merges), EOS, EOS as pad
    cond = bundle.encode_prompts(["the cat", "a dog"])
    assert cond.context.shape == (2, 77, 32) and torch.isfinite(cond.context).all()
    # the folder's scheduler decides: v-prediction, trailing spacing, zero-terminal SNR
    assert bundle.v_pred and bundle.zero_snr
    assert bundle.components.scheduler["timestep_spacing"] == "trailing"
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    oracle = DDPMScheduler.from_config(config).alphas_cumprod
    torch.testing.assert_close(bundle.alphas_cumprod, oracle, atol=1e-6, rtol=0)
    assert bundle.alphas_cumprod[-1] == 0
    assert any("zero-terminal SNR from scheduler" in n for n in bundle.notes)


def test_folder_with_only_fp16_variants_and_bin_weights_loads(tmp_path) -> None:
    parts = build_builtin("tiny-sd1")
    root = save_diffusers_folder(parts, tmp_path / "hub")
    for weights in (root / "unet").glob("*.safetensors"):  # Hub folders often ship only *.fp16.safetensors
        state, _ = read_file(weights)
        save_file({k: v.half() for k, v in state.items()}, str(weights.with_name(weights.stem + ".fp16.safetensors")))
        weights.unlink()
    for weights in (root / "vae").glob("*.safetensors"):  # older folders: pickled .bin (loaded weights-only)
        state, _ = read_file(weights)
        torch.save(state, weights.with_suffix(".bin"))
        weights.unlink()
    bundle = load_bundle(str(root), device="cpu")
    ref = parts.unet.state_dict()
    assert all(torch.equal(v, ref[k].half().float()) for k, v in bundle.unet.state_dict().items())
    assert all(torch.equal(v, parts.vae.state_dict()[k]) for k, v in bundle.vae.state_dict().items())


def test_sdxl_folder_keeps_each_tokenizers_pad(tmp_path) -> None:
    root = save_diffusers_folder(build_builtin("tiny-sdxl"), tmp_path / "xl")
    assert (root / "tokenizer_2" / "vocab.json").is_file() and (root / "tokenizer_2" / "merges.txt").is_file()
    folder_bundle = load_bundle(str(root), device="cpu")
    pads = [t.pad_token for t in folder_bundle.tokenizers]
    assert pads == ["<|endoftext|>", "!"]
    builtin = load_bundle("tiny-sdxl", device="cpu")
    a, b = folder_bundle.encode_prompts(["a cat"]), builtin.encode_prompts(["a cat"])
    # from_pretrained may pick another attention kernel: equal up to float rounding
    torch.testing.assert_close(a.context, b.context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_single_files_load_by_their_keys(dtype, tmp_path) -> None:
    parts = build_builtin("tiny-sdxl")
    path = civitai_file(parts, tmp_path / "pony-like.safetensors", dtype=dtype)
    bundle = load_bundle(str(path), device="cpu")
    assert bundle.family is Family.SDXL and not bundle.v_pred  # from conditioner.* keys, not the name
    ref = parts.unet.state_dict()
    assert all(torch.equal(v, ref[k].to(dtype).float()) for k, v in bundle.unet.state_dict().items())
    assert bundle.unet.dtype == torch.float32  # cast while reading, trained in the asked dtype


def test_ema_weights_only_with_use_ema(tmp_path) -> None:
    parts = build_builtin("tiny-sd1")
    path = civitai_file(parts, tmp_path / "full-ema.safetensors", ema=True)
    ema = ema_weights(path)
    regular = load_bundle(str(path), device="cpu")
    chosen = load_bundle(str(path), device="cpu", use_ema=True)
    theirs, ours = _unet_ldm(regular), _unet_ldm(chosen)
    assert ours.keys() == ema.keys()
    assert all(torch.equal(ours[k], ema[k]) for k in ema)
    assert all(torch.equal(theirs[k], v) for k, v in _unet_ldm(load_bundle("tiny-sd1", device="cpu")).items())
    assert any("carries EMA weights" in n for n in regular.notes)
    assert any("training the EMA U-Net" in n for n in chosen.notes)
    # the text encoders and VAE are the same either way
    assert all(torch.equal(a, b) for a, b in zip(regular.vae.state_dict().values(), chosen.vae.state_dict().values(), strict=True))


def test_use_ema_on_a_pruned_file_is_a_note(tmp_path) -> None:
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "pruned.safetensors")
    bundle = load_bundle(str(path), device="cpu", use_ema=True)
    assert any("no EMA weights" in n for n in bundle.notes)


def test_incomplete_ema_is_refused_by_name(tmp_path) -> None:
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "bad-ema.safetensors", ema=True)
    state, meta = read_file(path)
    del state[next(k for k in state if k.startswith("model_ema.diffusion_modelout"))]
    save_file(state, str(path), metadata=meta)
    with pytest.raises(InputError, match="model_use_ema: the EMA weights miss 1 U-Net"):
        load_bundle(str(path), device="cpu", use_ema=True)


def test_old_clip_prefix_and_separate_vae(tmp_path) -> None:
    parts = build_builtin("tiny-sd1")
    path = civitai_file(parts, tmp_path / "old.safetensors", old_clip_prefix=True, no_vae=True)
    assert not any(k.startswith("cond_stage_model.transformer.text_model.") for k in read_file(path)[0])
    with pytest.raises(InputError, match="no VAE weights.*vae field"):
        load_bundle(str(path), device="cpu")
    vae_file = tmp_path / "VAE" / "tiny.vae.safetensors"
    vae_file.parent.mkdir()
    save_file(vae_to_ldm(parts.vae.state_dict(), dict(parts.vae.config)), str(vae_file))
    bundle = load_bundle(str(path), str(vae_file), device="cpu")
    builtin = load_bundle("tiny-sd1", device="cpu")
    te, ref = bundle.text_encoders["lora_te"].state_dict(), builtin.text_encoders["lora_te"].state_dict()
    assert te.keys() == ref.keys() and all(torch.equal(te[k], ref[k]) for k in ref)
    assert all(torch.equal(a, b) for a, b in zip(bundle.vae.state_dict().values(), builtin.vae.state_dict().values(), strict=True))


# -- v-prediction and zero-terminal SNR -------------------------------------------------------------

LDM_V_YAML = 'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n'
SGM_V_YAML = ("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    denoiser_config:\n"
              "      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser\n      params:\n"
              "        scaling_config:\n          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
EPS_YAML = "model:\n  params:\n    linear_start: 0.00085\n"
ZSNR_YAML = LDM_V_YAML + "    zero_terminal_snr: true\n"


@pytest.mark.parametrize(("name", "kwargs", "yaml", "v_pred", "zero_snr"), [
    ("plain", {}, None, False, False),
    ("v-key", {"markers": ("v_pred",)}, None, True, False),
    ("v+ztsnr-keys", {"markers": ("v_pred", "ztsnr")}, None, True, True),
    ("modelspec-v", {"metadata": {"modelspec.prediction_type": "v"}}, None, True, False),
    ("kohya-zsnr", {"metadata": {"ss_zero_terminal_snr": "True"}}, None, False, True),
    ("ldm-yaml", {}, LDM_V_YAML, True, False),
    ("sgm-yaml", {}, SGM_V_YAML, True, False),
    ("yaml-decides", {"markers": ("v_pred",)}, EPS_YAML, False, False),
    ("yaml-zsnr", {}, ZSNR_YAML, True, True),
])
def test_prediction_markers(name, kwargs, yaml, v_pred, zero_snr, tmp_path) -> None:
    path = civitai_file(build_builtin("tiny-sdxl" if "sgm" in name else "tiny-sd1"), tmp_path / f"{name}.safetensors", **kwargs)
    if yaml:
        path.with_suffix(".yaml").write_text(yaml, encoding="utf-8")
    bundle = load_bundle(str(path), device="cpu")
    assert (bundle.v_pred, bundle.zero_snr) == (v_pred, zero_snr)
    assert (bundle.alphas_cumprod[-1] == 0).item() is zero_snr
    expected = compute_alphas_cumprod({"rescale_betas_zero_snr": zero_snr})
    assert torch.equal(bundle.alphas_cumprod, expected)
    if v_pred or zero_snr:
        assert any(("from" in n and (".yaml" in n or "key" in n or "modelspec" in n or "ss_zero" in n)) for n in bundle.notes)


def test_model_v_pred_still_forces(tmp_path) -> None:
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "eps.safetensors")
    bundle = load_bundle(str(path), device="cpu", v_pred=True)
    assert bundle.v_pred and any("model_v_pred" in n for n in bundle.notes)


def test_broken_yaml_is_one_line(tmp_path) -> None:
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "m.safetensors")
    path.with_suffix(".yaml").write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"m\.yaml: cannot be read as a model config") as info:
        load_bundle(str(path), device="cpu")
    assert "\n" not in str(info.value)


# -- refusals ---------------------------------------------------------------------------------------


def _stub_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(("keys", "message"), [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 2)}, "SD3/SD3.5 checkpoint"),
    ({"joint_blocks.0.x_block.attn.qkv.weight": (3, 2)}, "SD3/SD3.5 checkpoint"),
    ({"double_blocks.0.img_attn.qkv.weight": (3, 2), "single_blocks.0.linear1.weight": (2, 2)}, "Flux checkpoint"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (3, 2),
      "model.diffusion_model.single_blocks.0.linear1.weight": (2, 2)}, "Flux checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}, "inpainting checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 8, 3, 3)}, "InstructPix2Pix"),
    ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 1280)}, "SDXL refiner"),
    ({"conv_in.weight": (32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (2, 2)}, "bare diffusers U-Net"),
])
def test_unsupported_single_files_are_named(keys, message, tmp_path) -> None:
    path = _stub_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(InputError, match=message) as info:
        load_bundle(str(path), device="cpu")
    text = str(info.value)
    assert text.startswith(str(path)) and "\n" not in text
    if "checkpoint" in message or "refiner" in message:
        assert "not supported yet" in text and "SD1, SD2" in text


@pytest.mark.parametrize(("index", "unet", "message"), [
    ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, None, "a Flux model"),
    ({"_class_name": "StableDiffusion3Pipeline"}, None, "an SD3/SD3.5 model"),
    ({"_class_name": "StableDiffusionPipeline"}, {"in_channels": 9}, "an inpainting model"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, {"in_channels": 4}, "SDXL refiner"),
])
def test_unsupported_folders_are_named(index, unet, message, tmp_path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps(unet))
        (root / "text_encoder_2").mkdir()
        (root / "text_encoder_2" / "config.json").write_text("{}")
        if "Img2Img" not in index["_class_name"]:
            (root / "text_encoder").mkdir()
            (root / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=message) as info:
        load_bundle(str(root), device="cpu")
    assert "not supported" in str(info.value) and "\n" not in str(info.value)


def test_a_failed_load_leaves_no_model_in_memory(tmp_path, monkeypatch) -> None:
    """The model loads, then the chosen VAE does not fit: nothing built on the way may stay alive, even
    while the caller holds the error (a UI shows it, a queue keeps it)."""
    import trainer.models.checkpoint as checkpoint

    built: list[weakref.ref] = []
    original = checkpoint.build_empty

    def spy(configs):
        parts = original(configs)
        built.extend(weakref.ref(m) for m in (parts[0], parts[1], *parts[2]))
        return parts

    monkeypatch.setattr(checkpoint, "build_empty", spy)
    path = civitai_file(build_builtin("tiny-sd1"), tmp_path / "m.safetensors")
    wrong_vae = tmp_path / "wrong.vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 3, 3, 3)}, str(wrong_vae))
    with pytest.raises(InputError, match="vae: does not fit") as info:
        load_bundle(str(path), str(wrong_vae), device="cpu")
    gc.collect()
    assert built and all(ref() is None for ref in built), "a half-loaded model is still referenced"
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_standalone_lists_every_kind(tmp_path) -> None:
    models = tmp_path / "models"
    ckpts, vaes = models / "Stable-diffusion", models / "VAE"
    parts = build_builtin("tiny-sd1")
    save_single_file(parts, ckpts / "sub" / "anime.safetensors")
    civitai_file(parts, ckpts / "half.safetensors", dtype=torch.float16)
    save_diffusers_folder(parts, ckpts / "my-diffusers")
    (ckpts / "half.yaml").write_text(EPS_YAML)
    save_file(vae_to_ldm(parts.vae.state_dict(), dict(parts.vae.config)), str(ckpts / "half.vae.safetensors"))
    vaes.mkdir()
    save_file(vae_to_ldm(parts.vae.state_dict(), dict(parts.vae.config)), str(vaes / "sdxl_vae.safetensors"))
    parts.vae.save_pretrained(vaes / "diffusers-vae")
    host = StandaloneHost(models)
    listed = host.list_models()
    assert listed[:3] == ["half.safetensors", "my-diffusers", str(Path("sub") / "anime.safetensors")]
    assert not any("unet" in m or "text_encoder" in m or m.endswith(".yaml") for m in listed)
    assert host.list_vaes() == ["", "diffusers-vae", "sdxl_vae.safetensors", "half.vae.safetensors"]
    bundle = load_bundle(host.resolve("my-diffusers"), host.resolve("half.vae.safetensors", "vae"), device="cpu")
    assert bundle.family is Family.SD1


def test_standalone_lists_a_comfyui_models_folder(tmp_path) -> None:
    # ComfyUI: checkpoints/ for whole checkpoints, diffusion_models/ (formerly unet/) for transformer files
    models = tmp_path / "ComfyUI" / "models"
    save_single_file(build_builtin("tiny-sd1"), models / "checkpoints" / "sd.safetensors")
    for folder in ("diffusion_models", "unet"):
        (models / folder).mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, str(models / folder / f"z_{folder}.safetensors"))
    host = StandaloneHost(models)
    listed = host.list_models()
    dit = [str(Path("diffusion_models") / "z_diffusion_models.safetensors"), str(Path("unet") / "z_unet.safetensors")]
    assert listed[:3] == ["sd.safetensors", *dit]
    assert host.resolve(dit[0]) == str(models / dit[0]) and host.resolve("sd.safetensors").endswith("sd.safetensors")
