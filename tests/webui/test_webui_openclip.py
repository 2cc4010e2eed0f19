"""OpenCLIP text encoders in the Web-UI (SD2, SDXL's second encoder): the unfused attention computes what
the fused one does, and a trained LoRA, folded into the fused weights the way the Lora extension loads
it (q/k/v rows of ``in_proj_weight``), reproduces the conditioning the adapters produced in training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.models.openclip import SplitProjection, hf_view, refuse_attention, release_view, unfuse_attention


def _masks(length: int, batch: int, heads: int):
    causal = torch.full((length, length), float("-inf")).triu(1)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, -2:] = True
    return [
        {},
        {"attn_mask": causal},
        {"attn_mask": torch.ones(length, length, dtype=torch.bool).triu(1)},
        {"attn_mask": causal.expand(batch * heads, length, length)},
        {"key_padding_mask": padding},
        {"attn_mask": torch.ones(length, length, dtype=torch.bool).triu(1), "key_padding_mask": padding},
    ]


@pytest.mark.parametrize("batch_first", [False, True])
def test_unfused_attention_equals_the_fused_one_and_comes_off(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    cases = _masks(5, 3, 4)
    with torch.no_grad():
        fused = [attention(x, x, x, need_weights=False, **kw)[0] for kw in cases]
        q, k, v = unfuse_attention(attention)
        assert unfuse_attention(attention) == (q, k, v)  # idempotent
        split = [attention(x, x, x, need_weights=False, **kw)[0] for kw in cases]
    for kw, a, b in zip(cases, fused, split, strict=True):
        assert torch.allclose(a, b, atol=1e-6), (list(kw), (a - b).abs().max())
    # the views own nothing: the fused weight is the only storage
    assert isinstance(q, SplitProjection) and list(q.parameters()) == []
    assert k.weight.data_ptr() == attention.in_proj_weight[16:].data_ptr()
    assert refuse_attention(attention) and "forward" not in attention.__dict__
    assert not refuse_attention(attention)


def test_views_carry_gradients_to_adapters_on_q_k_v():
    torch.manual_seed(1)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    attention.requires_grad_(False)
    q, k, v = unfuse_attention(attention)
    extra = nn.Parameter(torch.zeros(8, 8))
    v.forward = lambda x: nn.functional.linear(x, v.weight + extra, v.bias)  # a stand-in adapter on v only
    x = torch.randn(2, 4, 8)
    attention(x, x, x, need_weights=False)[0].square().sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    assert attention.in_proj_weight.grad is None


def test_hf_view_names_and_release(models):
    text = models.OpenCLIPText(32, 3, batch_first=False)
    view = hf_view(text.transformer, layers=2)
    names = {n for n, _ in view.named_modules()}
    assert "text_model.encoder.layers.1.self_attn.v_proj" in names and "text_model.encoder.layers.1.mlp.fc2" in names
    assert "text_model.encoder.layers.2.self_attn.q_proj" not in names  # only the blocks that run
    assert view.text_model.encoder.layers[0].mlp.fc1 is text.transformer.resblocks[0].mlp.c_fc
    assert release_view(view) == 2
    assert not any("forward" in m.__dict__ for m in text.modules())


def _fold(model: nn.Module, state: dict[str, torch.Tensor], prefix: str, openclip: bool) -> int:
    """Merge kohya LoRA weights into a text encoder's own weights, independently of our code: q/k/v go
    to their rows of the fused ``in_proj_weight`` (as A1111's Lora extension does for OpenCLIP)."""
    folded = 0
    for key in [k for k in state if k.startswith(prefix + "_text_model_encoder_layers_") and k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down, up = state[name + ".lora_down.weight"].float(), state[name + ".lora_up.weight"].float()
        delta = up @ down * (float(state[name + ".alpha"]) / down.shape[0])
        layer, leaf = name[len(prefix + "_text_model_encoder_layers_"):].split("_", 1)
        if openclip:
            block = model.transformer.resblocks[int(layer)]
            rows = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2}
            if leaf in rows:
                d = block.attn.embed_dim
                target = block.attn.in_proj_weight[rows[leaf] * d:(rows[leaf] + 1) * d]
            else:
                target = {"self_attn_out_proj": block.attn.out_proj, "mlp_fc1": block.mlp.c_fc,
                          "mlp_fc2": block.mlp.c_proj}[leaf].weight
        else:
            hf = model.text_model if hasattr(model, "text_model") else model
            layer_module = hf.encoder.layers[int(layer)]
            target = {"self_attn_q_proj": layer_module.self_attn.q_proj, "self_attn_k_proj": layer_module.self_attn.k_proj,
                      "self_attn_v_proj": layer_module.self_attn.v_proj, "self_attn_out_proj": layer_module.self_attn.out_proj,
                      "mlp_fc1": layer_module.mlp.fc1, "mlp_fc2": layer_module.mlp.fc2}[leaf].weight
        with torch.no_grad():
            target += delta.to(target.dtype)
        folded += 1
    return folded


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_trained_openclip_lora_folded_into_fused_weights_matches_training(webui, models, family):
    from test_webui_training import train

    from trainer.hosts.webui import WebUIHost

    model = models.LatentDiffusionSD2(seed=3) if family == "sd2" else models.DiffusionEngine(seed=2)
    webui.sd_model = model
    pristine = copy.deepcopy(model)
    prompts = ["a photo", "red"]
    with WebUIHost().acquire("", "", precision="fp32", v_pred=None) as bundle:
        net, _ = train(bundle, ("BASE",), steps=3)
        with torch.no_grad():
            ours = bundle.encode_prompts(prompts)
            with net.scaled(0.0):
                base = bundle.encode_prompts(prompts)
        state = {k: v.detach().clone() for k, v in net.kohya_state_dict(torch.float32).items()}
        net.detach()
    if family == "sd2":
        assert _fold(pristine.cond_stage_model.wrapped.model, state, "lora_te", openclip=True) == 12
    else:
        embedders = pristine.conditioner.embedders
        assert _fold(embedders[0].wrapped.transformer, state, "lora_te1", openclip=False) == 12
        assert _fold(embedders[1].wrapped.model, state, "lora_te2", openclip=True) == 12
    with torch.no_grad():
        from trainer.models.webui_runtime import WebUIBundle

        folded = WebUIBundle(pristine, device=torch.device("cpu"), medvram=True).encode_prompts(prompts)
    moved = float((ours.context - base.context).abs().max())
    assert moved > 1e-4, "the trained text-encoder LoRA did not change the conditioning"
    assert torch.allclose(folded.context, ours.context, atol=1e-5), float((folded.context - ours.context).abs().max())
    if family == "sdxl":
        assert float((ours.pooled - base.pooled).abs().max()) > 1e-4
        assert torch.allclose(folded.pooled, ours.pooled, atol=1e-5)


def test_an_attention_wrapped_by_someone_else_is_left_alone(models):
    """Another extension's instance forward on one attention: nothing is unfused, the text encoder is
    reported untrained, BASE would be refused with the reason."""
    from trainer.models.webui_runtime import WebUIBundle

    model = models.LatentDiffusionSD2(seed=3)
    theirs = model.cond_stage_model.wrapped.model.transformer.resblocks[1].attn
    theirs.forward = lambda *a, **k: type(theirs).forward(theirs, *a, **k)
    bundle = WebUIBundle(model, device=torch.device("cpu"))
    assert bundle.text_encoders == {}
    assert "instance forward" in bundle.text_encoder_note and bundle.text_encoder_note in bundle.notes
    forwards = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert forwards == ["cond_stage_model.wrapped.model.transformer.resblocks.1.attn"]
