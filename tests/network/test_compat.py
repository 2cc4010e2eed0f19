"""Loader compatibility: every saved module name resolves to exactly the module we trained, under the
key maps of A1111 1.10's built-in Lora extension and of ComfyUI/Forge, and the weight change those
loaders rebuild from the file equals ours. Matrix: SD1, SD2, SDXL × lierla, c3lier, loha, lokr, dora.

The two key maps are small emulations written from the documented rules (reference platform.md §7,
ecosystem.md §4.3), applied to the module names each loader sees:

* A1111 names every module ``diffusion_model_<ldm path>`` (U-Net), ``transformer_<HF CLIP path>`` (SD1
  TE), OpenCLIP ``model_transformer_resblocks_N_{attn,attn_out_proj,mlp_c_fc,mlp_c_proj}`` (SD2 TE;
  SDXL TE2 with a ``1_`` prefix; q/k/v are chunks of the fused ``attn``) and ``0_transformer_…`` (SDXL
  TE1). A key is first converted with ``convert_diffusers_name_to_compvis`` (3 ldm blocks per level),
  then q/k/v are folded onto the fused attention, then ``lora_unet``→``diffusion_model`` and
  ``lora_te1_text_model``→``0_transformer_text_model`` are tried.
* ComfyUI/Forge map ``lora_unet_<ldm path>`` and ``lora_unet_<diffusers path>`` (through a
  config-driven diffusers→ldm table) and ``lora_te[12]?_text_model_encoder_layers_N_…``.

The U-Nets here have ``layers_per_block=2`` like the real ones, because A1111 hard-codes that layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from trainer.models.bundle import Family, UNetShape
from trainer.network import NetworkSpec, build_network, load_lora, save_lora

from .conftest import FakeBundle, ldm_view, tiny_clip, tiny_unet

FAMILIES = ("sd1", "sd2", "sdxl")
TYPES = ("lierla", "c3lier", "loha", "lokr", "dora")
_LEAVES = (nn.Linear, nn.Conv2d)


@dataclass
class CompatModel:
    bundle: FakeBundle
    ldm: nn.Module


def _make(family: str) -> CompatModel:
    sdxl = family == "sdxl"
    unet = tiny_unet(sdxl, sd2=family == "sd2", layers=2)
    shape = UNetShape(2, (True, False) if sdxl else (False, True))
    if sdxl:
        tes = {"lora_te1": tiny_clip(32, 1), "lora_te2": tiny_clip(48, 2)}
    else:
        tes = {"lora_te": tiny_clip(48 if family == "sd2" else 32, 1)}
    bundle = FakeBundle(Family(family), "diffusers", shape, unet, tes)
    return CompatModel(bundle, ldm_view(unet, shape))


@pytest.fixture(scope="module")
def models() -> dict[str, CompatModel]:
    return {family: _make(family) for family in FAMILIES}


# -- A1111 1.10 -------------------------------------------------------------------------------------
_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _open_clip_suffix(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def a1111_convert(key: str, is_sd2: bool) -> str:
    """A1111's diffusers→compvis key conversion (3 ldm blocks per level, as the Web-UI assumes)."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{rest}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_open_clip_suffix(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"1_model_transformer_resblocks_{m[1]}_{_open_clip_suffix(m[2])}"
    return key


def _layers(encoder: nn.Module) -> nn.ModuleList:
    """CLIP encoder layers (transformers ≥5 drops the ``text_model`` wrapper of ``CLIPTextModel``)."""
    return getattr(encoder, "text_model", encoder).encoder.layers


def _hf_names(encoder: nn.Module) -> dict[str, nn.Module]:
    """``text_model.``-rooted HF CLIP module names, as the Web-UI's transformers 4.x names them."""
    root = "" if hasattr(encoder, "text_model") else "text_model."
    return {f"{root}{n}".rstrip("."): m for n, m in encoder.named_modules()}


def _open_clip_names(encoder: nn.Module, prefix: str) -> dict[str, object]:
    """The names A1111 gives an OpenCLIP text encoder; ``attn`` is the fused q/k/v (a dict of parts)."""
    out: dict[str, object] = {}
    for n, layer in enumerate(_layers(encoder)):
        base = f"{prefix}model_transformer_resblocks_{n}"
        attn = layer.self_attn
        out[f"{base}_attn"] = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}
        out[f"{base}_attn_out_proj"] = attn.out_proj
        out[f"{base}_mlp_c_fc"] = layer.mlp.fc1
        out[f"{base}_mlp_c_proj"] = layer.mlp.fc2
    return out


def a1111_layer_mapping(model: CompatModel) -> dict[str, object]:
    """``network_layer_mapping`` as A1111 builds it for this model (ldm U-Net, family-specific TE)."""
    mapping: dict[str, object] = {}
    tes = model.bundle.text_encoders
    family = model.bundle.family
    if family is Family.SDXL:
        mapping.update({f"0_transformer_{n.replace('.', '_')}": m for n, m in _hf_names(tes["lora_te1"]).items()})
        mapping.update(_open_clip_names(tes["lora_te2"], "1_"))
    elif family is Family.SD2:
        mapping.update(_open_clip_names(tes["lora_te"], ""))
    else:
        mapping.update({f"transformer_{n.replace('.', '_')}": m for n, m in _hf_names(tes["lora_te"]).items()})
    mapping.update({f"diffusion_model_{n.replace('.', '_')}": m for n, m in model.ldm.named_modules() if n})
    return mapping


def a1111_resolve(name: str, mapping: dict[str, object]) -> nn.Module | None:
    """The module A1111 1.10 applies the file's ``name.*`` tensors to (None = silently dropped)."""
    is_sd2 = any(k.startswith("model_transformer_resblocks") for k in mapping)
    key = a1111_convert(name, is_sd2)
    module = mapping.get(key)
    if module is None:
        m = re.match(r"(.*)_([qkv]_proj)$", key)
        fused = mapping.get(m[1]) if m else None
        if isinstance(fused, dict):
            module = fused[m[2]]  # A1111 applies it to that chunk of the fused in_proj weight
    if module is None and "lora_unet" in name:
        module = mapping.get(name.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in name:
        module = mapping.get(name.replace("lora_te1_text_model", "0_transformer_text_model"))
        if module is None:
            module = mapping.get(name.replace("lora_te1_text_model", "transformer_text_model"))
    return module if isinstance(module, nn.Module) else None


# -- ComfyUI / Forge ----------------------------------------------------------------------------------
def comfy_unet_to_diffusers(config) -> dict[str, str]:
    """diffusers module prefix → ldm prefix, from the U-Net config (ComfyUI's ``unet_to_diffusers`` idea:
    L resnets (+ attention) and one sampler per down level, L + 1 per up level)."""
    table: dict[str, str] = {}
    per = config.layers_per_block
    levels = len(config.block_out_channels)
    resnet_map = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}

    def resnet(src: str, dst: str) -> None:
        for a, b in resnet_map.items():
            table[f"{src}.{a}"] = f"{dst}.{b}"

    n = 1
    for x, kind in enumerate(config.down_block_types):
        for i in range(per):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if "CrossAttn" in kind:
                table[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{n}.1"
            n += 1
        if x < levels - 1:
            table[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    table["mid_block.attentions.0"] = "middle_block.1"
    for i in range(2):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{2 * i}")
    n = 0
    for x, kind in enumerate(config.up_block_types):
        attention = "CrossAttn" in kind
        for i in range(per + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            if attention:
                table[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{n}.1"
            if i == per and x < levels - 1:
                table[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if attention else 1}.conv"
            n += 1
    return table


def comfy_key_map(model: CompatModel) -> dict[str, nn.Module]:
    """ComfyUI/Forge ``model_lora_keys_unet`` + ``model_lora_keys_clip`` for this model: kohya name → module."""
    keys: dict[str, nn.Module] = {}
    for path, module in model.ldm.named_modules():
        if isinstance(module, _LEAVES):
            keys[f"lora_unet_{path.replace('.', '_')}"] = module
    table = comfy_unet_to_diffusers(model.bundle.unet.config)
    for path, module in model.bundle.unet.named_modules():
        if not isinstance(module, _LEAVES):
            continue
        head = next((h for h in sorted(table, key=len, reverse=True) if path == h or path.startswith(h + ".")), None)
        if head is not None:
            ldm_path = table[head] + path[len(head):]
            keys[f"lora_unet_{path.replace('.', '_')}"] = model.ldm.get_submodule(ldm_path)
    sdxl = model.bundle.family is Family.SDXL
    for prefix, encoder in model.bundle.text_encoders.items():
        lora_prefix = prefix if sdxl else "lora_te"  # clip_l → lora_te (SD1) / lora_te1 (SDXL); clip_h → lora_te; clip_g → lora_te2
        for n, layer in enumerate(_layers(encoder)):
            parts = {"self_attn_q_proj": layer.self_attn.q_proj, "self_attn_k_proj": layer.self_attn.k_proj,
                     "self_attn_v_proj": layer.self_attn.v_proj, "self_attn_out_proj": layer.self_attn.out_proj,
                     "mlp_fc1": layer.mlp.fc1, "mlp_fc2": layer.mlp.fc2}
            for suffix, module in parts.items():
                keys[f"{lora_prefix}_text_model_encoder_layers_{n}_{suffix}"] = module
    return keys


# -- the weight change a loader rebuilds from the file (A1111 1.10 / ComfyUI formulas) -----------------
def loader_delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW at multiplier 1 as the loaders compute it from one module's saved tensors."""
    shape = weight.shape
    if "lora_down.weight" in tensors:
        up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
        dim = down.shape[0]
        updown = (up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)).reshape(shape)
    elif "hada_w1_a" in tensors:
        t = tensors
        dim = t["hada_w1_b"].shape[0]
        updown = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
    else:
        w1 = tensors["lokr_w1"]
        if "lokr_w2" in tensors:
            w2, dim = tensors["lokr_w2"], None
        else:
            w2, dim = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], tensors["lokr_w2_a"].shape[1]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2).reshape(shape)
    alpha = tensors.get("alpha")
    scale = float(alpha) / dim if alpha is not None and dim else 1.0
    updown = updown * scale
    if "dora_scale" in tensors:
        merged = updown + weight
        norm = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
        updown = merged * (tensors["dora_scale"] / norm) - weight
    return updown


# -- tests --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """(family, type) -> (network, {module name: {suffix: tensor}}) read back from a saved file."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, network_type: str):
        if (family, network_type) not in cache:
            bundle = models[family].bundle
            net = build_network(bundle, NetworkSpec(network_type, 4, 2, conv_rank=2, conv_alpha=1))
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            path = tmp_path_factory.mktemp("compat") / f"{family}_{network_type}.safetensors"
            save_lora(path, net.kohya_state_dict(torch.float32), {})
            state, _ = load_lora(path)
            grouped: dict[str, dict[str, torch.Tensor]] = {}
            for key, tensor in state.items():
                name, _, suffix = key.partition(".")
                grouped.setdefault(name, {})[suffix] = tensor
            cache[family, network_type] = (net, grouped)
        return cache[family, network_type]

    return get


def _assert_complete(net, grouped, resolve) -> None:
    unresolved = [name for name in grouped if resolve(name) is None]
    assert not unresolved, f"{len(unresolved)} module names dropped, e.g. {unresolved[:3]}"
    resolved = {name: resolve(name) for name in grouped}
    wrong = [n for n, m in resolved.items() if m is not net.adapters[n].base]
    assert not wrong, f"resolved to another module: {wrong[:3]}"
    assert len({id(m) for m in resolved.values()}) == len(grouped) == len(net.adapters)  # one-to-one, nothing left


@pytest.mark.parametrize("network_type", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_maps_every_saved_module(models, saved, family, network_type):
    net, grouped = saved(family, network_type)
    mapping = a1111_layer_mapping(models[family])
    _assert_complete(net, grouped, lambda name: a1111_resolve(name, mapping))
    # the weight change A1111 rebuilds from the file is ours (DoRA's dora_scale layout included)
    for name, tensors in grouped.items():
        adapter = net.adapters[name]
        with torch.no_grad():
            ours = adapter.delta_weight()
            theirs = loader_delta(tensors, adapter.base.weight)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("network_type", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_forge_map_every_saved_module(models, saved, family, network_type):
    net, grouped = saved(family, network_type)
    keys = comfy_key_map(models[family])
    _assert_complete(net, grouped, keys.get)


@pytest.mark.parametrize("family", FAMILIES)
def test_emulated_maps_agree_with_the_ldm_view(models, family):
    """The ComfyUI diffusers→ldm table (written here, independent of trainer.models.names) lands on the
    very module the ldm view holds, for every U-Net Linear/Conv2d inside the blocks."""
    model = models[family]
    keys = comfy_key_map(model)
    diffusers_names = {f"lora_unet_{p.replace('.', '_')}": m for p, m in model.bundle.unet.named_modules()
                       if isinstance(m, _LEAVES) and p.startswith(("down_blocks", "mid_block", "up_blocks"))}
    assert len(diffusers_names) > 50
    assert all(keys[k] is m for k, m in diffusers_names.items())


def test_sdxl_diffusers_names_would_break_a1111_upsampler(models):
    """Why SDXL is saved in sgm names: A1111's formula puts up_blocks.0's upsampler at slot 1, but SDXL's
    first up level has attentions, so the conv is at slot 2 and the key would be dropped."""
    mapping = a1111_layer_mapping(models["sdxl"])
    assert a1111_resolve("lora_unet_up_blocks_0_upsamplers_0_conv", mapping) is None
    assert a1111_resolve("lora_unet_output_blocks_2_2_conv", mapping) is not None
