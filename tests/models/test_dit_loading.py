"""Loading the flow DiT families offline, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.errors import InputError
from trainer.models.diffusers_runtime import load_bundle
from trainer.models.dit_loading import TURBO_NOTE, save_dit_folder
from trainer.models.tiny_dit import build_tiny_dit

# Z-Image/Anima need diffusers >= 0.42 (0.37's Z-Image transformer gives NaN; trainer/models/dit.py refuses it)
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in __import__("diffusers").__version__.split(".")[:2]) < (0, 42),
    reason="Z-Image/Anima need diffusers >= 0.42")



@pytest.fixture(scope="module")
def zimage_folder(tmp_path_factory):
    return save_dit_folder(build_tiny_dit("tiny-zimage"), tmp_path_factory.mktemp("m") / "Z-Image-Turbo-tiny")


def test_a_zimage_diffusers_folder_loads_offline_as_the_builtin(zimage_folder):
    loaded = load_bundle(str(zimage_folder), device="cpu")
    builtin = load_bundle("tiny-zimage", device="cpu")
    assert loaded.family.value == "zimage" and loaded.flow.shift == 3.0
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])
    out = loaded.predict(x, sigma, loaded.encode_prompts(["a red cat"]))
    ref = builtin.predict(x, sigma, builtin.encode_prompts(["a red cat"]))
    assert torch.allclose(out, ref, atol=1e-5)
    assert TURBO_NOTE in loaded.notes  # a Turbo checkpoint warns how to train it


def test_zimage_folder_without_text_encoder_is_refused_before_loading(zimage_folder, tmp_path):
    import shutil

    broken = tmp_path / "zi"
    shutil.copytree(zimage_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(InputError, match="without text_encoder/ \\(its Qwen3 text encoder\\)"):
        load_bundle(str(broken), device="cpu")


def test_a_mismatched_vae_is_refused(zimage_folder, tmp_path):
    vae = tmp_path / "sdvae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}), encoding="utf-8")
    with pytest.raises(InputError, match="has 4 latent channels but Z-Image needs 16"):
        load_bundle(str(zimage_folder), str(vae), device="cpu")


@pytest.mark.parametrize(("cls", "what"), [("FluxPipeline", "Flux"), ("QwenImagePipeline", "Qwen-Image"),
                                           ("ChromaPipeline", "Chroma")])
def test_next_release_families_are_named(tmp_path, cls, what):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}), encoding="utf-8")
    with pytest.raises(InputError, match=f"a {what} model .*next release"):
        load_bundle(str(tmp_path), device="cpu")


def test_single_dit_files_are_named_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    zimage = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file({"model.diffusion_model.context_refiner.0.attention.k_norm.weight": torch.ones(2)}, str(zimage))
    with pytest.raises(InputError, match="Z-Image transformer without its text encoder: choose .* in the text_encoder field"):
        load_bundle(str(zimage), device="cpu")
    anima = tmp_path / "anima.safetensors"
    save_file({"net.llm_adapter.embed.weight": torch.ones(2, 2)}, str(anima))
    with pytest.raises(InputError, match="Anima transformer file: load it as .safetensors with its text encoder"):
        load_bundle(str(anima), device="cpu")


def test_an_old_diffusers_is_refused_with_one_line():
    from trainer.errors import TrainTrainError
    from trainer.models.dit import check_diffusers_version

    check_diffusers_version("0.42.1")
    check_diffusers_version("1.0.0.dev0")
    with pytest.raises(TrainTrainError, match=r"needs diffusers >= 0\.42 \(this environment has 0\.37\.1"):
        check_diffusers_version("0.37.1")


# -- the Z-Image single-file set (transformer + Qwen3 + VAE files, as ComfyUI / Forge Neo users keep them) -----

# Native names of Forge Neo's NextDiT with Z-Image modulation (backend/nn/lumina.py: JointAttention qkv/out/
# q_norm/k_norm, FeedForward w1-w3, the four RMSNorms, FinalLayer linear + adaLN_modulation.1, pad tokens)
NEO_NEXTDIT = {
    "x_embedder.weight", "x_embedder.bias", "x_pad_token", "cap_pad_token", "cap_embedder.N.weight", "cap_embedder.N.bias",
    "t_embedder.mlp.N.weight", "t_embedder.mlp.N.bias", "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.N.weight", "final_layer.adaLN_modulation.N.bias",
    *(f"{stack}.N.{leaf}" for stack in ("layers", "noise_refiner", "context_refiner") for leaf in (
        "attention.qkv.weight", "attention.out.weight", "attention.q_norm.weight", "attention.k_norm.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm1.weight",
        "ffn_norm1.weight", "attention_norm2.weight", "ffn_norm2.weight")),
    *(f"{stack}.N.adaLN_modulation.N.{p}" for stack in ("layers", "noise_refiner") for p in ("weight", "bias")),
}


@pytest.fixture(scope="module")
def zimage_files(tmp_path_factory):
    """The tiny Z-Image as a Forge Neo user keeps it (fp32, ``model.diffusion_model.`` keys)."""
    from trainer.models.dit_files import save_zimage_files

    parts = build_tiny_dit("tiny-zimage")
    parts.name = "z_image_turbo_tiny"
    root = tmp_path_factory.mktemp("neo") / "models"
    paths = save_zimage_files(parts, root, prefix="model.diffusion_model.",
                              folders=("Stable-diffusion", "text_encoder", "VAE"))
    return root, *(str(p) for p in paths)


def _prediction(bundle):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    return bundle.predict(x, torch.tensor([0.3, 0.8]), bundle.encode_prompts(["a red cat", "a dog on grass"]))


def test_native_transformer_keys_are_forge_neos_nextdit():
    import re

    from trainer.models.dit_files import zimage_to_native

    native = zimage_to_native(build_tiny_dit("tiny-zimage").transformer.state_dict())
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in native} == NEO_NEXTDIT


def test_the_zimage_file_set_loads_offline_and_predicts_as_the_builtin(zimage_files):
    _, dit, te, vae = zimage_files
    loaded = load_bundle(dit, vae, device="cpu", text_encoder=te)
    builtin = load_bundle("tiny-zimage", device="cpu")
    assert loaded.family.value == "zimage" and loaded.flow.shift == 3.0
    assert TURBO_NOTE in loaded.notes  # the file name says Turbo
    # latent scale/shift come from the shipped (real) VAE config, as the built-in's
    assert (loaded.vae.config.scaling_factor, loaded.vae.config.shift_factor) == (0.3611, 0.1159)
    out, ref = _prediction(loaded), _prediction(builtin)
    assert ref.abs().mean() > 0.1 and torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gen = torch.Generator().manual_seed(2)
    latents = loaded.encode_images(pixels, gen)
    assert torch.allclose(latents, builtin.encode_images(pixels, torch.Generator().manual_seed(2)), atol=1e-5)


def test_a_bf16_comfyui_file_set_without_prefix_loads_the_rounded_weights(tmp_path):
    from trainer.models.dit_files import load_zimage_files, save_zimage_files

    parts = build_tiny_dit("tiny-zimage")
    paths = save_zimage_files(parts, tmp_path, dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:
        assert "layers.0.attention.qkv.weight" in f.keys() and f.get_tensor("x_embedder.weight").dtype == torch.bfloat16
    loaded = load_zimage_files(*map(str, paths), dtype=torch.float32)
    for ours, theirs in ((parts.transformer, loaded.transformer), (parts.text_encoder, loaded.text_encoder),
                         (parts.vae, loaded.vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].to(torch.bfloat16).float(), b[k]) for k in a)
    assert not loaded.turbo


def _refuses_before_reading(monkeypatch, match, *args):
    """The set is refused from the files' headers: reading any weights would fail the test."""
    import trainer.models.checkpoint as checkpoint

    def no_reads(*_a, **_k):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr(checkpoint, "read_state_dict", no_reads)
    with pytest.raises(InputError, match=match) as err:
        load_bundle(*args[:2], device="cpu", text_encoder=args[2])
    assert "\n" not in str(err.value)


def test_a_transformer_file_without_its_text_encoder_names_the_field(zimage_files, monkeypatch):
    _, dit, _, vae = zimage_files
    _refuses_before_reading(monkeypatch, "Z-Image transformer without its text encoder: choose the Qwen3-4B file "
                                         r"\(qwen_3_4b.safetensors\) in the text_encoder field", dit, vae, None)
    _refuses_before_reading(monkeypatch, "without a VAE: choose the Flux VAE .* in the vae field", dit, None,
                            zimage_files[2])


def test_a_text_encoder_of_the_wrong_size_or_kind_is_refused(zimage_files, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    _, dit, te, vae = zimage_files
    small = Qwen3Model(Qwen3Config(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    wrong = tmp_path / "qwen_3_06b.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in small.state_dict().items()}, str(wrong))
    _refuses_before_reading(monkeypatch, "text_encoder: has hidden size 16 but this Z-Image transformer reads "
                                         "32-wide features", dit, vae, str(wrong))
    _refuses_before_reading(monkeypatch, "text_encoder: is not a Qwen3 text encoder file", dit, vae, vae)


def test_a_vae_with_other_latent_channels_is_refused(zimage_files, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from trainer.models.checkpoint import _atomic_save
    from trainer.models.ldm import vae_to_ldm

    _, dit, te, _ = zimage_files
    sd_vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)
    path = tmp_path / "sd_vae.safetensors"
    _atomic_save(vae_to_ldm(sd_vae.state_dict(), dict(sd_vae.config)), path, {})  # first_stage_model.* keys
    _refuses_before_reading(monkeypatch, "vae: has 4 latent channels but Z-Image needs 16 .*ae.safetensors",
                            dit, str(path), te)


def test_no_tokenizer_found_offline_names_the_field_and_the_folder(zimage_files, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    from trainer.models.dit_files import find_qwen_tokenizer

    _, dit, te, vae = zimage_files
    lonely = tmp_path / "elsewhere" / "qwen_3_4b.safetensors"
    lonely.parent.mkdir()
    shutil.copy(te, lonely)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(InputError, match="text_encoder: no Qwen tokenizer found offline .* in .*elsewhere/tokenizer"):
        find_qwen_tokenizer(str(lonely))
    # Forge Neo's copy above the file is found (backend/huggingface/Tongyi-MAI/Z-Image-Turbo/tokenizer)
    neo = tmp_path / "elsewhere" / "backend" / "huggingface" / "Tongyi-MAI" / "Z-Image-Turbo" / "tokenizer"
    shutil.copytree(zimage_files[0] / "text_encoder" / "tokenizer", neo)
    assert find_qwen_tokenizer(str(lonely)) == neo


def test_the_cli_trains_ileco_on_a_neo_file_set(zimage_files, tmp_path):
    from trainer.__main__ import main
    from trainer.hosts.standalone import StandaloneHost
    from trainer.network import load_lora

    root, dit, te, vae = zimage_files
    assert StandaloneHost(str(root), str(tmp_path)).list_text_encoders() == ["", "qwen_3_4b.safetensors"]
    result_path = tmp_path / "r.json"
    code = main(["train", "--mode", "iLECO", "--model", dit, "--te", "qwen_3_4b.safetensors", "--vae", vae,
                 "--models-dir", str(root), "--lora-dir", str(tmp_path / "out"), "--quiet",
                 "--original-prompt", "a cat", "--target-prompt", "a dog", "--result-json", str(result_path),
                 "--set", "train_iterations=3", "--set", "save_lora_name=zfiles", "--set", "image_size(height, width)=64",
                 "--set", "train_snr_gamma=0", "--set", "save_as_json=false"])
    result = json.loads(result_path.read_text())
    assert code in (0, 1) and result["status"] == "done" and result["steps"] == 3, result  # 1: "did not learn"
    state, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == "zimage" and meta["modelspec.prediction_type"] == "flow"
    assert any(k.startswith("diffusion_model.layers.0.attention.to_q.") for k in state)


# -- the Anima single-file set (transformer with its LLM adapter + Qwen3-0.6B + Qwen-Image VAE files) --------


def _byte_t5_fast():
    """A saveable T5-like tokenizer giving the built-in's ByteT5Tokenizer ids (pad 0, eos 1, byte b -> 3 + b)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from trainer.models.tiny_dit import _byte_order
    from trainer.models.tokenizer import _byte_symbols

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{s: 3 + _byte_order(s) for s in _byte_symbols()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def anima_files(tmp_path_factory):
    """The tiny Anima as a ComfyUI user keeps it (``net.`` keys, ``llm_adapter.`` inside)."""
    from trainer.models.anima_files import save_anima_files

    parts = build_tiny_dit("tiny-anima")
    paths = save_anima_files(parts, tmp_path_factory.mktemp("comfy") / "models", tokenizer_2=_byte_t5_fast())
    return tuple(str(p) for p in paths)


def test_the_anima_file_set_loads_offline_and_predicts_as_the_builtin(anima_files):
    from safetensors import safe_open

    dit, te, vae = anima_files
    with safe_open(dit, "pt") as f:  # the released layout: Cosmos native names under net., the adapter inside
        keys = set(f.keys())
    assert {"net.blocks.0.self_attn.q_proj.weight", "net.blocks.0.adaln_modulation_cross_attn.1.weight",
            "net.x_embedder.proj.1.weight", "net.t_embedding_norm.weight", "net.final_layer.linear.weight",
            "net.llm_adapter.blocks.0.cross_attn.k_norm.weight", "net.llm_adapter.norm.weight"} <= keys
    loaded = load_bundle(dit, vae, device="cpu", text_encoder=te)
    builtin = load_bundle("tiny-anima", device="cpu")
    assert loaded.family.value == "anima" and loaded.flow.shift == 3.0
    assert list(loaded.vae.config.latents_std) == list(builtin.vae.config.latents_std)  # per-channel, from the config
    out, ref = _prediction(loaded), _prediction(builtin)
    assert ref.abs().mean() > 0.1 and torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


def test_our_wan_vae_names_are_diffusers_converters_for_the_released_layout():
    """Two residual blocks per level (the released Wan 2.1 / Qwen-Image VAE): diffusers' own converter reads our
    native names back to the same parameters; its hard-coded indices are what our formula gives."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from trainer.models.anima_files import wan_to_native

    vae = AutoencoderKLQwenImage(base_dim=8, num_res_blocks=2)
    state = vae.state_dict()
    native = wan_to_native(state, 2)
    assert "decoder.upsamples.4.shortcut.weight" in native and "decoder.upsamples.11.resample.1.weight" in native
    back = convert_wan_vae_to_diffusers(native)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)


def test_anima_bad_input_is_one_line_before_any_weight_is_read(anima_files, zimage_files, monkeypatch):
    dit, te, vae = anima_files
    _refuses_before_reading(monkeypatch, "Anima transformer without its text encoder: choose the Qwen3-0.6B file .* "
                                         "in the text_encoder field", dit, vae, None)
    _refuses_before_reading(monkeypatch, "text_encoder: is not a Qwen3 text encoder file", dit, vae, vae)
    _refuses_before_reading(monkeypatch, "vae: is an SD/Flux-style VAE .*; Anima needs the Qwen-Image VAE", dit,
                            zimage_files[3], te)
    _refuses_before_reading(monkeypatch, "vae: is a Qwen-Image/Wan VAE \\(Anima's\\); Z-Image needs the Flux VAE",
                            zimage_files[1], vae, zimage_files[2])
    _refuses_before_reading(monkeypatch, "Anima transformer without a VAE: choose the Qwen-Image VAE", dit, None, te)


def test_anima_wrong_text_encoder_size_and_missing_t5_tokenizer(anima_files, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from trainer.models.anima_files import find_t5_tokenizer

    dit, te, vae = anima_files
    wide = Qwen3Model(Qwen3Config(vocab_size=300, hidden_size=48, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    path = tmp_path / "qwen_3_4b.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    _refuses_before_reading(monkeypatch, "text_encoder: has hidden size 48 but Anima's LLM adapter reads 32 "
                                         r"\(Qwen3-0.6B\)", dit, vae, str(path))
    lonely = tmp_path / "alone" / "qwen_3_06b_base.safetensors"
    lonely.parent.mkdir()
    shutil.copy(te, lonely)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(InputError, match="text_encoder: no T5 tokenizer found offline .*alone/tokenizer_2"):
        find_t5_tokenizer(str(lonely))
    assert find_t5_tokenizer(te).name == "tokenizer_2"  # the one beside the ComfyUI file


def test_the_real_models_sizes_are_read_back_from_their_shapes():
    """Built on the meta device from the shipped real configs (Z-Image-Turbo 6.15B, Qwen3-4B, Flux VAE, Anima's
    1.96B Cosmos DiT + adapter, Qwen3-0.6B, Qwen-Image VAE), written in native names: the configs read from
    those shapes are the shipped ones, so a real file builds the real architecture."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, CosmosTransformer3DModel, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from trainer.models import anima_files, dit_files
    from trainer.models.anima_adapter import LLMAdapter
    from trainer.models.ldm import vae_to_ldm

    def shapes(state):
        return {k.removeprefix("first_stage_model."): tuple(v.shape) for k, v in state.items()}

    def real(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    z_t, z_v = real(dit_files.read_config("transformer")), real(dit_files.read_config("vae"))
    with torch.device("meta"):
        zimage, flux_vae = ZImageTransformer2DModel(**z_t), AutoencoderKL(**z_v)
        qwen4b = Qwen3Model(Qwen3Config(**dit_files.read_config("text_encoder")))
        cosmos, wan = CosmosTransformer3DModel(**anima_files.read_config("transformer")), AutoencoderKLQwenImage(
            **anima_files.read_config("vae"))
        adapter = LLMAdapter(**anima_files.read_config("llm_adapter"))
        qwen06b = Qwen3Model(Qwen3Config(**anima_files.read_config("text_encoder")))
    assert 6.1e9 < sum(p.numel() for p in zimage.parameters()) < 6.2e9
    assert 1.9e9 < sum(p.numel() for p in cosmos.parameters()) < 2.0e9
    assert dit_files.transformer_config(shapes(dit_files.zimage_to_native(zimage.state_dict()))) == z_t
    assert dit_files.vae_config(shapes(vae_to_ldm(flux_vae.state_dict(), z_v))) == z_v
    for model, cfg in ((qwen4b, dit_files.read_config("text_encoder")), (qwen06b, anima_files.read_config("text_encoder"))):
        got = dit_files.text_encoder_config(shapes(model.state_dict()))
        assert {k: got[k] for k in cfg} == cfg
    assert anima_files.transformer_config(shapes(anima_files.cosmos_to_native(cosmos.state_dict()))) == \
        anima_files.read_config("transformer")
    assert anima_files.vae_config(shapes(anima_files.wan_to_native(wan.state_dict(), 2))) == anima_files.read_config("vae")
    assert anima_files.adapter_config(shapes(adapter.state_dict())) == {**anima_files.read_config("llm_adapter"),
                                                                         "layer_norm": False}


def test_the_cli_trains_a_lora_on_an_anima_file_set(anima_files, tmp_path):
    from PIL import Image

    from trainer.__main__ import main
    from trainer.network import load_lora

    dit, te, vae = anima_files
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 60 * i, 40)).save(data / f"i{i}.png")
    result_path = tmp_path / "r.json"
    sets = {"lora_data_directory": data, "image_size(height, width)": 64, "image_buckets_step": 32, "image_min_length": 32,
            "train_iterations": 2, "train_batch_size": 1, "save_lora_name": "anima_files", "train_snr_gamma": 0}
    code = main(["train", "--mode", "LoRA", "--model", dit, "--text-encoder", te, "--vae", vae, "--quiet",
                 "--lora-dir", str(tmp_path / "out"), "--result-json", str(result_path),
                 *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    result = json.loads(result_path.read_text())
    assert code in (0, 1) and result["status"] == "done" and result["steps"] == 2, result
    state, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == "anima"
    assert any(k.startswith("lora_unet_blocks_0_cross_attn_k_proj.") for k in state)


def test_an_fp8_scaled_file_is_refused_naming_its_field(zimage_files, tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, dit, te, vae = zimage_files
    with safe_open(te, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["model.layers.0.mlp.down_proj.scale_weight"] = torch.ones(1)  # ComfyUI's "fp8 scaled" marker
    scaled = tmp_path / "qwen_3_4b_fp8_scaled.safetensors"
    save_file(state, str(scaled))
    _refuses_before_reading(monkeypatch, "text_encoder: is an fp8-scaled file .* choose the bf16 or fp16 file", dit, vae,
                            str(scaled))
