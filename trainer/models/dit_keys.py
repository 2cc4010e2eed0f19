"""LoRA key names for the DiT families, as the loaders users use read them.

Facts (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` and Forge Neo's copy in
``modules_forge/packages/comfy/lora.py``):

* Every model: a base weight ``diffusion_model.<path>.weight`` is reached by ``lora_unet_<path, dots as _>``
  and by ``diffusion_model.<path>``, where ``<path>`` is the model's *native* (original checkpoint) name.
* Z-Image (ComfyUI ``Lumina2``; Neo: repo name contains ``z-image``): ``z_image_to_diffusers`` also accepts
  diffusers module names under ``diffusion_model.`` / ``transformer.`` / bare, mapping ``to_q``/``to_k``/``to_v``
  to slices of the fused native ``attention.qkv`` and ``to_out.0`` to ``attention.out``; ``feed_forward.w1/2/3``
  keep their names. The reference product writes Z-Image LoRAs the same way (``diffusion_model.`` + dotted path).
* Anima: no family branch; the generic native map serves. kohya's Anima trainer writes ``lora_unet_`` +
  native names (``blocks.N.self_attn.q_proj`` …); diffusers' single-file converter gives the native ⇄ diffusers
  renames for Cosmos-Predict2 (``blocks``→``transformer_blocks``, ``self_attn``/``cross_attn``→``attn1``/``attn2``,
  ``q_proj``/``k_proj``/``v_proj``/``output_proj``→``to_q``/``to_k``/``to_v``/``to_out.0``,
  ``mlp.layer1``/``mlp.layer2``→``ff.net.0.proj``/``ff.net.2``).

We adapt the attention and MLP linears of the transformer blocks (Z-Image: also its refiners): the
modules every DiT trainer adapts; modulation and embedding layers stay frozen.
"""

from __future__ import annotations

import re

ZIMAGE_LEAF = re.compile(r"^(?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.(?:to_q|to_k|to_v|to_out\.0)"
                         r"|feed_forward\.w[123])$")
ANIMA_LEAF = re.compile(r"^transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))$")

_ANIMA_TO_NATIVE = (("transformer_blocks.", "blocks."), (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
                    (".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out.0", ".output_proj"),
                    (".ff.net.0.proj", ".mlp.layer1"), (".ff.net.2", ".mlp.layer2"))


def anima_native(path: str) -> str:
    """Native (ComfyUI/Neo/kohya) name of a diffusers ``CosmosTransformer3DModel`` module path."""
    for old, new in _ANIMA_TO_NATIVE:
        path = path.replace(old, new)
    return path


def dit_leaf(family: str, path: str) -> bool:
    """Whether the module at diffusers ``path`` gets an adapter."""
    return bool((ZIMAGE_LEAF if family == "zimage" else ANIMA_LEAF).match(path))


def dit_names(family: str, path: str) -> tuple[str, str]:
    """(internal adapter name, saved key prefix) of a DiT module path.

    The internal name is dot-free (it names a submodule); the saved prefix is what ComfyUI and Forge
    Neo map: ``diffusion_model.<diffusers path>`` for Z-Image, ``lora_unet_<native path>`` for Anima.
    """
    if family == "zimage":
        return "lora_unet_" + path.replace(".", "_"), "diffusion_model." + path
    native = anima_native(path)
    name = "lora_unet_" + native.replace(".", "_")
    return name, name


# tensor names that start a key's suffix (kohya LoRA/LoHa/LoKr/DoRA): everything before is the module
_SUFFIX_HEADS = ("lora_down", "lora_up", "lora_mid", "alpha", "dora_scale", "scale", "diff", "diff_b")


def split_key(key: str) -> tuple[str, str]:
    """(module name, tensor suffix) of a LoRA key, also for dotted module names (``diffusion_model.…``)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if parts[i] in _SUFFIX_HEADS or parts[i].startswith(("hada_", "lokr_")):
            return ".".join(parts[:i]), ".".join(parts[i:])
    module, _, suffix = key.partition(".")
    return module, suffix
