"""Networks read from a LoRA file (``network_resume``, Difference copier): shapes come from the file."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

from trainer.errors import SettingsError
from trainer.models.dit_keys import split_key
from trainer.network.adapter import Adapter
from trainer.network.dora import DoRAModule
from trainer.network.kohya_io import load_lora
from trainer.network.loha import LoHaModule
from trainer.network.lokr import LoKrModule
from trainer.network.lora import LoRAModule
from trainer.network.network import LoadReport, Network
from trainer.network.select import Target, candidate_targets
from trainer.network.spec import NetworkSpec

_FAMILY_OF_VERSION = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("zimage", "zimage"), ("anima", "anima"))


def file_family(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """The model family a LoRA file was trained for (``sd1``/``sd2``/``sdxl``), None when unknown.

    Metadata decides (``ss_base_model_version``, ``ss_v2``); without it, ``lora_te1_``/``lora_te2_``
    keys mean SDXL and ``lora_te_`` keys mean SD1 or SD2 (returned as ``sd1|sd2``).
    """
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in _FAMILY_OF_VERSION:
        if version.startswith(prefix):
            return family
    if metadata.get("ss_v2") == "True":
        return "sd2"
    if metadata.get("ss_v2") == "False" and metadata.get("ss_network_module"):
        return "sd1"
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in state_dict):
        return "sdxl"
    if any(k.startswith("lora_te_") for k in state_dict):
        return "sd1|sd2"
    return None


def _check_family(bundle: Any, path: str, family: str | None) -> None:
    ours = str(getattr(bundle.family, "value", bundle.family))
    if family is not None and ours not in family.split("|"):
        raise SettingsError(
            "network_resume",
            f"{os.fspath(path)} is a {family.upper()} LoRA but the model is {ours.upper()}; "
            f"choose a LoRA trained on {ours.upper()} or load a {family.upper()} model",
        )


STRENGTH_KEY = "traintrain_network_strength"


def saved_strength(metadata: dict[str, str]) -> float:
    """The ``network_strength`` baked into a file we wrote (1 for other trainers' files and older ones)."""
    try:
        strength = float(metadata.get(STRENGTH_KEY, "1"))
    except ValueError:
        return 1.0
    return strength if strength > 0 and strength == strength and strength != float("inf") else 1.0


def _adapter_from_tensors(target: Target, tensors: dict[str, torch.Tensor], **kwargs: Any) -> Adapter | None:
    """An adapter shaped like the file's tensors for ``target``, or None when the file has none."""
    if "lokr_w1" in tensors:
        rank = LoKrModule.rank_from_tensors(tensors)
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        w1_shape = tuple(tensors["lokr_w1"].shape)
        full = "lokr_w2" in tensors
        return LoKrModule(target.kohya_name, target.module, rank, alpha, w1_shape=w1_shape, full_w2=full, **kwargs)
    if "hada_w1_b" in tensors:
        cls: type[Adapter] = LoHaModule
    elif "lora_down.weight" in tensors:
        cls = DoRAModule if "dora_scale" in tensors else LoRAModule
    else:
        return None  # e.g. LoKr with a split w1 or Tucker cores: reported as unexpected keys
    rank = cls.rank_from_tensors(tensors)
    alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
    return cls(target.kohya_name, target.module, rank, alpha, **kwargs)


def _spec_of(bundle: Any, adapters: dict[str, Adapter], fallback: NetworkSpec | None) -> NetworkSpec:
    """A spec describing the file's network (type and most common ranks), other fields from ``fallback``."""
    algos = {a.algo for a in adapters.values()}
    attention = {t.kohya_name for t in candidate_targets(bundle, NetworkSpec("lierla", 1, 1))}
    beyond_attention = any(name not in attention for name in adapters)
    if algos & {"loha", "lokr", "dora"}:
        network_type = next(a for a in ("loha", "lokr", "dora") if a in algos)
    else:
        network_type = "c3lier" if beyond_attention else "lierla"
    linear = Counter((a.rank, float(a.alpha)) for a in adapters.values() if a.kind != "conv")
    conv = Counter((a.rank, float(a.alpha)) for a in adapters.values() if a.kind == "conv")
    rank, alpha = linear.most_common(1)[0][0] if linear else conv.most_common(1)[0][0]
    conv_rank, conv_alpha = conv.most_common(1)[0][0] if conv else (0, 0.0)
    blocks = fallback.blocks if fallback else NetworkSpec("lierla", 1, 1).blocks
    element = fallback.element if fallback else "Full"
    return NetworkSpec(network_type, rank, alpha, conv_rank, conv_alpha, blocks, element)


def network_from_file(
    bundle: Any,
    path: str | os.PathLike[str],
    spec_fallback: NetworkSpec | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    trained: bool = False,
) -> Network:
    """Build a network whose modules, ranks, alphas and algorithms come from a LoRA file, and load it.

    Block, element and rank settings are ignored (reference §8.8); ``spec_fallback`` only fills
    ``blocks``/``element`` of ``network.spec``. ``network.load_report`` lists file keys that matched
    no module of this model (e.g. ``conv_in`` adapters of other trainers).

    Args:
        trained: take the ``network_strength`` our saves bake in back out (a copier or a run to continue
            needs the weights as trained); False keeps the file's weights as a Web-UI applies them.

    Raises:
        InputError: the file cannot be read.
        SettingsError: ``network_resume``: the file is for another family, or no module matches.
    """
    state_dict, metadata = load_lora(path)
    _check_family(bundle, os.fspath(path), file_family(state_dict, metadata))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module_name, suffix = split_key(key)
        grouped.setdefault(module_name, {})[suffix] = tensor
    probe = NetworkSpec("c3lier", 1, 1)  # every module any network type adapts
    adapters: dict[str, Adapter] = {}
    targets: list[Target] = []
    for target in candidate_targets(bundle, probe):
        name = next((n for n in (target.kohya_name, *target.aliases) if n in grouped), None)
        adapter = _adapter_from_tensors(target, grouped[name], dtype=dtype, device=device) if name else None
        if adapter is not None:
            adapters[target.kohya_name] = adapter
            targets.append(target)
    if not adapters:
        raise SettingsError("network_resume", f"{os.fspath(path)}: no LoRA module in the file matches this model")
    network = Network(adapters, _spec_of(bundle, adapters, spec_fallback), tuple(targets), None)
    network.load_kohya_state_dict(state_dict, strength=saved_strength(metadata) if trained else 1.0)
    return network


def load_network_weights(network: Network, path: str | os.PathLike[str], bundle: Any = None) -> LoadReport:
    """Load a LoRA file's tensors into an existing network (same names and shapes), as trained: the
    ``network_strength`` our saves bake in is taken back out, so a continued run does not compound it.

    Args:
        bundle: the model the network is for; when given, a file made for another family is refused.

    Raises:
        InputError: the file cannot be read.
        SettingsError: ``network_resume``: the file is for another model family than ``bundle``.
    """
    state_dict, metadata = load_lora(path)
    if bundle is not None:
        _check_family(bundle, os.fspath(path), file_family(state_dict, metadata))
    return network.load_kohya_state_dict(state_dict, strength=saved_strength(metadata))
