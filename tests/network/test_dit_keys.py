"""Saved DiT LoRA keys load where users load them: ComfyUI / Forge Neo key maps, diffusers, metadata.

The loader maps below are written from the facts of ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``)
and ``comfy/utils.py`` (``z_image_to_diffusers``), which Forge Neo carries unchanged in
``modules_forge/packages/comfy``: they take the loader's *native* model keys (not our names) as input.
"""

from __future__ import annotations

import pytest
import torch

from trainer.models.dit import DiTBundle
from trainer.models.dit_keys import split_key
from trainer.models.tiny_dit import build_tiny_dit
from trainer.network import NetworkSpec, build_network, load_lora, network_from_file, save_lora
from trainer.network.metadata import build_metadata_fields

# Z-Image/Anima need diffusers >= 0.42 (0.37's Z-Image transformer gives NaN; trainer/models/dit.py refuses it)
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in __import__("diffusers").__version__.split(".")[:2]) < (0, 42),
    reason="Z-Image/Anima need diffusers >= 0.42")



def _bundle(name: str) -> DiTBundle:
    return DiTBundle(build_tiny_dit(name), device=torch.device("cpu"), dtype=torch.float32)


def _random_network(bundle, network_type="lierla"):
    torch.manual_seed(0)
    network = build_network(bundle, NetworkSpec(network_type, 4, 4))
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)
    return network


# -- the loaders' maps (native model keys in, LoRA key -> weight key or (weight key, offset) out) --------


def comfy_generic(native_weights: list[str]) -> dict:
    out: dict = {}
    for k in native_weights:  # every model: lora_unet_<native, _-joined> and diffusion_model.<native>
        out["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        out[k[: -len(".weight")]] = k
    return out


def comfy_zimage(n_layers: int, n_refiner: int, dim: int) -> dict:
    """ComfyUI's Lumina2 branch: diffusers names (under diffusion_model./transformer./bare) -> native keys."""
    native, out = [], {}
    blocks = [f"layers.{i}" for i in range(n_layers)] + [f"{g}.{i}" for g in ("context_refiner", "noise_refiner")
                                                          for i in range(n_refiner)]
    for b in blocks:
        qkv = f"diffusion_model.{b}.attention.qkv.weight"
        native += [qkv, f"diffusion_model.{b}.attention.out.weight"] + [f"diffusion_model.{b}.feed_forward.w{j}.weight"
                                                                         for j in (1, 2, 3)]
        diff = {f"{b}.attention.to_q": (qkv, (0, 0, dim)), f"{b}.attention.to_k": (qkv, (0, dim, dim)),
                f"{b}.attention.to_v": (qkv, (0, 2 * dim, dim)), f"{b}.attention.to_out.0": f"diffusion_model.{b}.attention.out.weight"}
        diff.update({f"{b}.feed_forward.w{j}": f"diffusion_model.{b}.feed_forward.w{j}.weight" for j in (1, 2, 3)})
        for k, to in diff.items():
            for prefix in ("diffusion_model.", "transformer.", ""):
                out[prefix + k] = to
    return {**comfy_generic(native), **out}


def anima_native_weights(n_blocks: int) -> list[str]:
    """Cosmos-Predict2 / Anima native linear weights (Forge Neo ``backend/nn/anima.py`` names)."""
    keys = []
    for i in range(n_blocks):
        for attn in ("self_attn", "cross_attn"):
            keys += [f"diffusion_model.blocks.{i}.{attn}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "output_proj")]
        keys += [f"diffusion_model.blocks.{i}.mlp.layer{j}.weight" for j in (1, 2)]
        keys += [f"diffusion_model.blocks.{i}.adaln_modulation_{m}.{j}.weight" for m in ("self_attn", "cross_attn", "mlp")
                 for j in (1, 2)]
    return keys + ["diffusion_model.x_embedder.proj.1.weight", "diffusion_model.final_layer.linear.weight"]


@pytest.mark.parametrize("network_type", ["lierla", "loha"])
def test_every_zimage_key_maps_in_comfyui_and_neo(network_type):
    bundle = _bundle("tiny-zimage")
    cfg = bundle.unet.config
    key_map = comfy_zimage(cfg.n_layers, cfg.n_refiner_layers, cfg.dim)
    state = _random_network(bundle, network_type).kohya_state_dict(torch.float32)
    modules = {split_key(k)[0] for k in state}
    assert len(modules) == 7 * (cfg.n_layers + 2 * cfg.n_refiner_layers)
    unmapped = sorted(m for m in modules if m not in key_map)
    assert not unmapped, unmapped[:5]
    assert all(m.startswith("diffusion_model.") for m in modules)  # the reference product's Z-Image form
    # q/k/v land in the right third of the fused qkv weight
    assert key_map["diffusion_model.layers.1.attention.to_v"] == ("diffusion_model.layers.1.attention.qkv.weight",
                                                                  (0, 2 * cfg.dim, cfg.dim))


def test_every_anima_key_maps_in_comfyui_and_neo():
    bundle = _bundle("tiny-anima")
    key_map = comfy_generic(anima_native_weights(bundle.unet.config.num_layers))
    state = _random_network(bundle).kohya_state_dict(torch.float32)
    modules = {split_key(k)[0] for k in state}
    assert len(modules) == 10 * bundle.unet.config.num_layers
    unmapped = sorted(m for m in modules if m not in key_map)
    assert not unmapped, unmapped[:5]
    assert all(m.startswith("lora_unet_blocks_") for m in modules)  # kohya's Anima form


@pytest.mark.parametrize("name", ["tiny-zimage", "tiny-anima"])
def test_saved_file_loads_back_into_the_same_adapters(tmp_path, name):
    bundle = _bundle(name)
    network = _random_network(bundle)
    path = save_lora(tmp_path / "x.safetensors", network.kohya_state_dict(torch.float32),
                     {"ss_base_model_version": bundle.family.base_model_version})
    loaded = network_from_file(bundle, path)
    assert sorted(loaded.adapters) == sorted(network.adapters)
    for key, adapter in network.adapters.items():
        for (k, a), (_, b) in zip(adapter.state_dict().items(), loaded.adapters[key].state_dict().items(), strict=True):
            assert torch.equal(a, b), (key, k)


def test_zimage_file_loads_in_diffusers_with_the_same_output(tmp_path):
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    bundle = _bundle("tiny-zimage")
    network = _random_network(bundle)
    path = save_lora(tmp_path / "z.safetensors", network.kohya_state_dict(torch.float32), {})
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = bundle.encode_prompts(["a cat", "a dog"])
    sigma = torch.tensor([0.3, 0.6])
    network.attach()
    try:
        ours = bundle.predict(x, sigma, cond)
    finally:
        network.detach()
    base = bundle.predict(x, sigma, cond)
    state = ZImageLoraLoaderMixin.lora_state_dict(str(path.parent), weight_name=path.name)
    state = state[0] if isinstance(state, tuple) else state
    bundle.unet.load_lora_adapter(state, prefix="transformer", adapter_name="t")
    theirs = bundle.predict(x, sigma, cond)
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())


@pytest.mark.parametrize(("family", "version", "arch"), [("zimage", "zimage", "Z-Image/lora"),
                                                         ("anima", "anima", "anima-preview/lora")])
def test_metadata_names_the_family_as_the_ecosystem_does(family, version, arch):
    meta = build_metadata_fields(family=family, v_pred=False, network_type="lierla", rank=4, alpha=4.0, output_name="x",
                                 model_name="m", image_size_hw=(1024, 1024), training_started_at=0.0)
    assert meta["ss_base_model_version"] == version
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.prediction_type"] == "flow"


def test_a_zimage_lora_is_refused_on_an_anima_model(tmp_path):
    zimage = _bundle("tiny-zimage")
    path = save_lora(tmp_path / "z.safetensors", _random_network(zimage).kohya_state_dict(torch.float32),
                     {"ss_base_model_version": "zimage"})
    from trainer.errors import SettingsError

    with pytest.raises(SettingsError, match="ZIMAGE LoRA but the model is ANIMA"):
        network_from_file(_bundle("tiny-anima"), path)
    assert load_lora(path)[1]["ss_base_model_version"] == "zimage"
