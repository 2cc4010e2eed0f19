"""Module selection per family × layout × type × element × blocks, block reports and save names."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from trainer.errors import SettingsError
from trainer.network import BLOCK_IDS, NetworkSpec, select_targets

SD1_LIERLA = {"BASE": 12, "IN01": 12, "M00": 12, "OUT02": 12, "OUT03": 12}
SD1_C3LIER = {"BASE": 12, "IN01": 15, "IN02": 1, "IN03": 4, "M00": 18, "OUT00": 4, "OUT01": 5, "OUT02": 16, "OUT03": 16}
SDXL_LIERLA = {"BASE": 24, "IN03": 22, "M00": 22, "OUT00": 22, "OUT01": 22}
SDXL_C3LIER = {"BASE": 24, "IN01": 3, "IN02": 1, "IN03": 26, "M00": 28, "OUT00": 26, "OUT01": 27, "OUT02": 4, "OUT03": 4}
ATTN_ONLY_SD1 = {"IN01": 4, "M00": 4, "OUT02": 4, "OUT03": 4}
ATTN_ONLY_SDXL = {"IN03": 8, "M00": 8, "OUT00": 8, "OUT01": 8}

TABLE = [
    # bundle fixture, type, element, blocks, expected counts
    ("sd1", "lierla", "Full", None, SD1_LIERLA),
    ("sd1", "c3lier", "Full", None, SD1_C3LIER),
    ("sd1", "loha", "Full", None, SD1_C3LIER),
    ("sd1", "lierla", "CrossAttention", None, ATTN_ONLY_SD1),
    ("sd1", "c3lier", "SelfAttention", None, ATTN_ONLY_SD1),
    ("sd1", "c3lier", "Full", ("IN02", "OUT01", "M00"), {"IN02": 1, "M00": 18, "OUT01": 5}),
    ("sd1", "lierla", "Full", ("BASE",), {"BASE": 12}),
    ("sdxl", "lierla", "Full", None, SDXL_LIERLA),
    ("sdxl", "c3lier", "Full", None, SDXL_C3LIER),
    ("sdxl", "lierla", "CrossAttention", None, ATTN_ONLY_SDXL),
    ("sdxl", "loha", "Full", ("IN03", "OUT02"), {"IN03": 26, "OUT02": 4}),
]


def _bundle(request, family: str, layout: str):
    return request.getfixturevalue(f"{family}_ldm_bundle" if layout == "ldm" else f"{family}_bundle")


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
@pytest.mark.parametrize(("family", "network_type", "element", "blocks", "expected"), TABLE)
def test_counts_per_block(request, layout, family, network_type, element, blocks, expected):
    bundle = _bundle(request, family, layout)
    spec = NetworkSpec(network_type, 4, 1, blocks=blocks or NetworkSpec("lierla", 1, 1).blocks, element=element)
    report = select_targets(bundle, spec)
    assert report.counts == expected
    assert len(report.targets) == sum(expected.values())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("network_type", ["lierla", "c3lier"])
def test_ldm_view_selects_the_same_modules_under_the_same_names(request, family, network_type):
    spec = NetworkSpec(network_type, 4, 1)
    a = select_targets(_bundle(request, family, "diffusers"), spec)
    b = select_targets(_bundle(request, family, "ldm"), spec)
    by_name = {t.kohya_name: t.module for t in b.targets}
    assert len(by_name) == len(a.targets)
    assert all(by_name[t.kohya_name] is t.module for t in a.targets)
    assert a.counts == b.counts


def test_sd1_names_are_diffusers_layout(sd1_ldm_bundle):
    names = {t.kohya_name for t in select_targets(sd1_ldm_bundle, NetworkSpec("c3lier", 4, 1)).targets}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in names
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in names
    assert "lora_unet_mid_block_resnets_1_time_emb_proj" in names
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj" in names
    assert not any("input_blocks" in n or "middle_block" in n for n in names)


def test_sdxl_names_are_sgm_layout_with_text_model_segment(sdxl_bundle):
    names = {t.kohya_name for t in select_targets(sdxl_bundle, NetworkSpec("c3lier", 4, 1)).targets}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names
    assert "lora_unet_input_blocks_2_0_op" in names
    assert "lora_unet_output_blocks_1_2_conv" in names
    assert "lora_unet_middle_block_2_skip_connection" not in names  # 64->64: no shortcut
    assert "lora_unet_output_blocks_0_0_skip_connection" in names
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj" in names
    assert not any("down_blocks" in n or "lora_te_" in n for n in names)


def test_conv_rank_applies_only_to_kxk_convs(sd1_bundle):
    report = select_targets(sd1_bundle, NetworkSpec("c3lier", 8, 4, conv_rank=2, conv_alpha=1))
    by_kind = {(t.kind, t.rank, t.alpha) for t in report.targets}
    assert by_kind == {("linear", 8, 4.0), ("conv1x1", 8, 4.0), ("conv", 2, 1.0)}
    fallback = select_targets(sd1_bundle, NetworkSpec("c3lier", 8, 4))
    assert {(t.rank, t.alpha) for t in fallback.targets} == {(8, 4.0)}


def test_unavailable_blocks_are_reported(sdxl_bundle, sd1_bundle):
    report = select_targets(sdxl_bundle, NetworkSpec("lierla", 4, 1, blocks=("IN03", "IN09", "OUT02")))
    assert report.counts == {"IN03": 22}
    assert report.unavailable == ("IN09", "OUT02")
    assert "IN09 does not exist in SDXL" in report.warnings
    assert any(w.startswith("OUT02: no modules that lierla adapts") for w in report.warnings)
    no_te = type(sd1_bundle)(**{**sd1_bundle.__dict__, "text_encoders": {}})
    report = select_targets(no_te, NetworkSpec("lierla", 4, 1, blocks=("BASE", "M00")))
    assert report.unavailable == ("BASE",) and report.counts == {"M00": 12}


def test_default_all_blocks_do_not_warn(sdxl_bundle):
    report = select_targets(sdxl_bundle, NetworkSpec("lierla", 4, 1))
    assert "IN09" in report.unavailable and report.warnings == ()


def test_nothing_selected_raises(sd1_bundle):
    with pytest.raises(SettingsError) as err:
        select_targets(sd1_bundle, NetworkSpec("lierla", 4, 1, blocks=("IN03", "IN09")))
    assert err.value.key == "network_blocks"
    with pytest.raises(SettingsError):
        select_targets(sd1_bundle, NetworkSpec("lierla", 4, 1, blocks=("BASE",), element="CrossAttention"))


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"network_type": "lora"}, "network_type"),
    ({"rank": 0}, "network_rank"),
    ({"element": "Cross"}, "network_element"),
    ({"blocks": ("IN12",)}, "network_blocks"),
    ({"alpha": -1}, "network_alpha"),
])
def test_spec_validation_names_the_key(kwargs, key):
    base = {"network_type": "lierla", "rank": 4, "alpha": 1}
    with pytest.raises(SettingsError) as err:
        NetworkSpec(**{**base, **kwargs})
    assert err.value.key == key


def test_spec_from_settings_and_empty_element():
    class S:
        network_type, network_rank, network_alpha = "c3lier", 16, 8.0
        network_conv_rank, network_conv_alpha = 0, 0
        network_blocks, network_element = ["BASE", "M00"], ""

    spec = NetworkSpec.from_settings(S())
    assert spec == NetworkSpec("c3lier", 16, 8.0, 0, 0.0, ("BASE", "M00"), "Full")


def test_summary_text(sd1_bundle):
    report = select_targets(sd1_bundle, NetworkSpec("c3lier", 4, 1))
    assert report.summary() == "U-Net 79 modules (48 linear, 31 conv), TE 12"


# -- real-size U-Nets on the meta device: the counts users see ------------------------------------------
_CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "models" / "configs"
SD_ATTENTION_BLOCKS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
XL_ATTENTION_BLOCKS = ("IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
# per block: resnet (conv1, conv2, time_emb_proj [+ conv_shortcut when channels change]), sampler conv, and
# 12 modules per SD1/SD2 transformer (proj_in/out + 10 in one block), 2 + 10·depth per SDXL transformer
SD_C3LIER = {
    "IN01": 15, "IN02": 15, "IN03": 1, "IN04": 16, "IN05": 15, "IN06": 1, "IN07": 16, "IN08": 15, "IN09": 1,
    "IN10": 3, "IN11": 3, "M00": 18, "OUT00": 4, "OUT01": 4, "OUT02": 5, "OUT03": 16, "OUT04": 16, "OUT05": 17,
    "OUT06": 16, "OUT07": 16, "OUT08": 17, "OUT09": 16, "OUT10": 16, "OUT11": 16,
}
XL_C3LIER = {
    "IN01": 3, "IN02": 3, "IN03": 1, "IN04": 26, "IN05": 25, "IN06": 1, "IN07": 106, "IN08": 105, "M00": 108,
    "OUT00": 106, "OUT01": 106, "OUT02": 107, "OUT03": 26, "OUT04": 26, "OUT05": 27, "OUT06": 4, "OUT07": 4, "OUT08": 4,
}
XL_LIERLA = {"IN04": 22, "IN05": 22, "IN07": 102, "IN08": 102, "M00": 102, "OUT00": 102, "OUT01": 102, "OUT02": 102,
             "OUT03": 22, "OUT04": 22, "OUT05": 22}


@pytest.fixture(scope="module")
def real_bundle():
    """``real_bundle(family)``: the shipped U-Net config built on the meta device (no memory, real names)."""
    import json

    import torch
    from diffusers import UNet2DConditionModel

    from trainer.models.bundle import Family, UNetShape

    from .conftest import FakeBundle

    cache = {}

    def make(family: str):
        if family not in cache:
            path = _CONFIGS / family / "unet" / "config.json"
            if not path.is_file():
                pytest.skip(f"{path} is not there yet")
            config = json.loads(path.read_text())
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(config)
            shape = UNetShape(config["layers_per_block"], tuple("CrossAttn" in t for t in config["up_block_types"]))
            cache[family] = FakeBundle(Family(family), "diffusers", shape, unet, {})
        return cache[family]

    return make


@pytest.mark.parametrize(("family", "network_type", "expected", "linear", "conv1x1", "conv"), [
    ("sd1", "lierla", {b: 12 for b in SD_ATTENTION_BLOCKS}, 160, 32, 0),
    ("sd2", "lierla", {b: 12 for b in SD_ATTENTION_BLOCKS}, 192, 0, 0),  # SD2 proj_in/out are Linear
    ("sdxl", "lierla", XL_LIERLA, 722, 0, 0),
    # + 22 resnets (time_emb_proj; conv_shortcut on 14 of them; conv1/conv2) + 6 sampler convs = 278
    ("sd1", "c3lier", SD_C3LIER, 160 + 22, 32 + 14, 2 * 22 + 6),
    ("sd2", "c3lier", SD_C3LIER, 192 + 22, 14, 2 * 22 + 6),
    # + 17 resnets (11 with a shortcut) + 4 sampler convs = 788
    ("sdxl", "c3lier", XL_C3LIER, 722 + 17, 11, 2 * 17 + 4),
    ("sd1", "dora", {b: 12 for b in SD_ATTENTION_BLOCKS}, 160, 32, 0),
    ("sd2", "loha", SD_C3LIER, 192 + 22, 14, 2 * 22 + 6),
    ("sdxl", "lokr", XL_C3LIER, 722 + 17, 11, 2 * 17 + 4),
])
def test_real_unet_counts(real_bundle, family, network_type, expected, linear, conv1x1, conv):
    bundle = real_bundle(family)
    report = select_targets(bundle, NetworkSpec(network_type, 4, 1))
    assert report.counts == expected
    kinds = Counter(t.kind for t in report.targets)
    assert (kinds["linear"], kinds["conv1x1"], kinds["conv"]) == (linear, conv1x1, conv)
    assert len(report.targets) == sum(expected.values()) == linear + conv1x1 + conv
    blocks = SD_ATTENTION_BLOCKS if family != "sdxl" else XL_ATTENTION_BLOCKS
    if network_type in ("lierla", "dora"):
        assert tuple(report.counts) == blocks  # the 17-list / 12-list
    else:  # the 26-list / 20-list minus IN00
        assert set(report.counts) == {b for b in BLOCK_IDS if b not in ("BASE", "IN00")} & (
            set(SD_C3LIER) if family != "sdxl" else set(XL_C3LIER))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("element", ["CrossAttention", "SelfAttention"])
def test_real_unet_attention_only(real_bundle, family, element):
    report = select_targets(real_bundle(family), NetworkSpec("lierla", 4, 1, element=element))
    # four projections (q, k, v, out) per attention of the chosen kind, in every transformer layer
    assert len(report.targets) == {"sd1": 64, "sd2": 64, "sdxl": 280}[family]
    segment = "attn2" if element == "CrossAttention" else "attn1"
    assert all(re.search(rf"\.{segment}\.(to_q|to_k|to_v|to_out\.0)$", t.path) for t in report.targets)


def test_real_sdxl_reports_missing_blocks(real_bundle):
    bundle = real_bundle("sdxl")
    report = select_targets(bundle, NetworkSpec("c3lier", 4, 1, blocks=("IN08", "IN09", "OUT11", "M00")))
    assert report.counts == {"IN08": 105, "M00": 108}
    assert report.unavailable == ("IN09", "OUT11")
    assert report.warnings == ("IN09, OUT11 do not exist in SDXL",)
    lierla = select_targets(bundle, NetworkSpec("lierla", 4, 1, blocks=("IN02", "IN04")))
    assert lierla.unavailable == ("IN02",) and lierla.warnings == ("IN02: no modules that lierla adapts in SDXL",)
