"""Single-file and diffusers-folder round trips, detection, strict VAE replacement, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.errors import InputError
from trainer.models.bundle import Family
from trainer.models.checkpoint import read_state_dict, save_diffusers_folder, save_single_file
from trainer.models.detect import detect_family, predicts_v
from trainer.models.diffusers_runtime import load_bundle
from trainer.models.ldm import vae_to_ldm

TINY = ("tiny-sd1", "tiny-sd2v", "tiny-sdxl")


def _weights(bundle) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in bundle.unet.state_dict().items()}
    out.update({f"vae.{k}": v for k, v in bundle.vae.state_dict().items()})
    for name, te in bundle.text_encoders.items():
        out.update({f"{name}.{k.removeprefix('text_model.')}": v for k, v in te.state_dict().items()})
    return out


def _prediction(bundle) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return bundle.predict(noisy, torch.tensor([10, 900]), bundle.encode_prompts(["a cat", "the dog"]))


def _assert_same(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the round trip is bit-exact in the weights ...
    # ... and wired the same; equal weights in differently laid-out tensors may round differently per CPU
    torch.testing.assert_close(_prediction(a), _prediction(b), atol=1e-6, rtol=1e-5)
    assert (a.family, a.v_pred) == (b.family, b.v_pred)


@pytest.fixture(scope="module")
def tiny_bundles() -> dict:
    return {name: load_bundle(name, device="cpu") for name in TINY}


@pytest.fixture(scope="module")
def tiny_files(tiny_bundles, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    return {n: save_single_file(b.components, folder / f"{n}.safetensors") for n, b in tiny_bundles.items()}


@pytest.mark.parametrize("name", TINY)
def test_single_file_round_trip_is_bit_exact(name, tiny_bundles, tiny_files) -> None:
    loaded = load_bundle(str(tiny_files[name]), device="cpu")
    _assert_same(tiny_bundles[name], loaded)
    assert loaded.name == name


@pytest.mark.parametrize("name", TINY)
def test_single_file_layout(name, tiny_files) -> None:
    state = load_file(tiny_files[name])
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    if name == "tiny-sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    elif name == "tiny-sd2v":
        assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
        assert "v_pred" in state
    else:
        assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state
        assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 48)
        assert "model.diffusion_model.label_emb.0.0.weight" in state


@pytest.mark.parametrize("name", TINY)
def test_diffusers_folder_round_trip(name, tiny_bundles, tmp_path) -> None:
    save_diffusers_folder(tiny_bundles[name].components, tmp_path / name)
    _assert_same(tiny_bundles[name], load_bundle(str(tmp_path / name), device="cpu"))


def test_v_pred_override(tiny_files) -> None:
    assert load_bundle(str(tiny_files["tiny-sd2v"]), device="cpu", v_pred=False).v_pred is False
    assert load_bundle(str(tiny_files["tiny-sd1"]), device="cpu", v_pred=True).v_pred is True


def test_v_pred_marker_detected_without_metadata(tiny_files, tmp_path) -> None:
    state = load_file(tiny_files["tiny-sd1"])
    meta = {k: v for k, v in _metadata(tiny_files["tiny-sd1"]).items()}
    configs = json.loads(meta["traintrain.configs"])
    configs["scheduler"]["prediction_type"] = "epsilon"
    meta["traintrain.configs"] = json.dumps(configs)
    save_file({**state, "v_pred": torch.tensor([])}, tmp_path / "v.safetensors", metadata=meta)
    assert load_bundle(str(tmp_path / "v.safetensors"), device="cpu").v_pred is True


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def _shapes(**dims: tuple[int, ...]) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in dims.items()}


@pytest.mark.parametrize(("width", "family"), [(768, Family.SD1), (1024, Family.SD2), (2048, Family.SDXL)])
def test_family_from_context_width(width, family) -> None:
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_family("m", {key: torch.empty(640, width, device="meta")}) is family


def test_family_from_text_encoder_keys() -> None:
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(1, device="meta")}
    assert detect_family("m", {**unet, "conditioner.embedders.1.model.ln_final.weight": torch.empty(1)}) is Family.SDXL
    assert detect_family("m", {**unet, "cond_stage_model.model.ln_final.weight": torch.empty(1)}) is Family.SD2
    assert detect_family("m", {**unet, "cond_stage_model.transformer.x": torch.empty(1)}) is Family.SD1


def test_refiner_is_refused() -> None:
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(InputError, match="SDXL refiner.*not supported"):
        detect_family("r", {key: torch.empty(768, 1280, device="meta")})


class _FakeUNet(torch.nn.Module):
    """Returns ``scale * x`` so the probe's mean(out - x) is (scale - 1) * 0.5."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.config = type("C", (), {"cross_attention_dim": 8, "in_channels": 4})()

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        return (x * self.scale,)


def test_sd2_numeric_probe() -> None:
    assert predicts_v(_FakeUNet(-4.0)) is True  # mean(out - x) = -2.5
    assert predicts_v(_FakeUNet(1.0)) is False


@pytest.mark.parametrize("kind", ["lora", "text", "random", "missing"])
def test_non_checkpoints_are_input_errors(kind, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    if kind == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, path)
    elif kind == "text":
        path.write_text("hello, I am not a model\n")
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    message = {"missing": "not found", "lora": "is a LoRA, not a model"}.get(kind, "is not a Stable Diffusion checkpoint")
    with pytest.raises(InputError, match=message):
        load_bundle(str(path), device="cpu")


@pytest.mark.parametrize("keep", [0.5, 40, 0])
def test_a_truncated_download_is_called_incomplete_first(keep, tiny_files, tmp_path) -> None:
    # a cut-off file was reported as "not a Stable Diffusion checkpoint", which sends people looking elsewhere
    data = Path(tiny_files["tiny-sd1"]).read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(InputError, match="incomplete or corrupt .*download or copy it again") as err:
        load_bundle(str(cut), device="cpu")
    assert "not a Stable Diffusion checkpoint" not in str(err.value)


def test_a_truncated_ckpt_is_called_incomplete(tmp_path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(4096)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(InputError, match="incomplete or corrupt"):
        load_bundle(str(path), device="cpu")


class _Payload:
    """Any class: unpickling it would need our code, which weights_only refuses."""


def test_pickle_needing_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Payload()}, path)
    with pytest.raises(InputError, match="pickled code"):
        load_bundle(str(path), device="cpu")


def test_weights_only_ckpt_loads(tiny_files, tmp_path) -> None:
    path = tmp_path / "m.ckpt"
    state = load_file(tiny_files["tiny-sd1"])
    torch.save({"state_dict": state}, path)
    read, metadata = read_state_dict(path)
    assert metadata == {} and read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)
    # a .ckpt has no traintrain metadata: the tiny architecture is judged against SD1 and refused clearly
    with pytest.raises(InputError, match="U-Net weights do not fit the sd1 architecture"):
        load_bundle(str(path), device="cpu")


def test_vae_replacement_ldm_and_diffusers_layout(tiny_bundles, tmp_path) -> None:
    donor = load_bundle("tiny-sdxl", device="cpu").vae  # same architecture, different weights
    ldm = tmp_path / "vae_ldm.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(donor.state_dict(), dict(donor.config)).items()}, ldm)
    diff = tmp_path / "vae_diffusers.safetensors"
    save_file(donor.state_dict(), diff)
    for path in (ldm, diff):
        bundle = load_bundle("tiny-sd1", vae=str(path), device="cpu")
        assert all(torch.equal(a, b) for a, b in zip(bundle.vae.state_dict().values(), donor.state_dict().values(), strict=True))


def test_wrong_vae_is_refused(tmp_path) -> None:
    small = load_bundle("small-sd1", device="cpu").unet  # not a VAE at all
    wrong = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, wrong)
    with pytest.raises(InputError, match="vae"):
        load_bundle("tiny-sd1", vae=str(wrong), device="cpu")
    vae = load_bundle("tiny-sd1", device="cpu").vae.state_dict()
    vae["encoder.conv_in.weight"] = torch.zeros(64, 3, 3, 3)
    shaped = tmp_path / "vae_bad.safetensors"
    save_file({k: v.contiguous() for k, v in vae.items()}, shaped)
    with pytest.raises(InputError, match="vae: does not fit"):
        load_bundle("tiny-sd1", vae=str(shaped), device="cpu")


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL])
def test_shipped_architectures_convert_both_ways(family) -> None:
    """Real-size layouts, on the meta device: our ldm writer and diffusers' readers agree on every key."""
    from trainer.models.components import build_empty, fit_clip_keys, read_config_dir, shipped_dir
    from trainer.models.ldm import TE_PREFIXES, components_to_ldm, te_from_ldm, unet_from_ldm, vae_from_ldm

    configs = read_config_dir(shipped_dir(family))
    unet, vae, tes = build_empty(configs)
    state = components_to_ldm(family, unet, vae, tes)
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_family("m", state) is family and key in state
    pairs = [(unet, unet_from_ldm(state, configs["unet"])), (vae, vae_from_ldm(state, configs["vae"]))]
    pairs += [(te, fit_clip_keys(te_from_ldm(state, p, o, te), te)) for te, (p, o) in zip(tes, TE_PREFIXES[family], strict=True)]
    for model, converted in pairs:
        expected = model.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)
