"""Module selection per family × layout × type × element × blocks, block reports and save names."""

from __future__ import annotations

import pytest

from trainer.errors import SettingsError
from trainer.network import NetworkSpec, select_targets

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
