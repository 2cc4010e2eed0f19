"""Which modules get adapters, and under which kohya names: a pure function returning a report (R11).

U-Net containers are recognised by class name in both layouts (diffusers ``Transformer2DModel`` /
``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D``; ldm/sgm ``SpatialTransformer`` / ``ResBlock`` /
``Downsample`` / ``Upsample``); every Linear/Conv2d inside a container is a candidate. Text-encoder
modules are recognised by their Hugging Face CLIP path. Blocks come from the ldm path via
``trainer.models.names``; save names follow kohya (SD1/SD2 U-Net in diffusers layout, SDXL in sgm layout).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from trainer.errors import SettingsError
from trainer.models import names
from trainer.network.adapter import is_linear
from trainer.network.spec import BLOCK_IDS, NetworkSpec

_TRANSFORMERS = frozenset({"Transformer2DModel", "SpatialTransformer", "SpatialTransformerV2"})
_RESNETS = frozenset({"ResnetBlock2D", "ResBlock"})
_SAMPLERS = frozenset({"Downsample2D", "Upsample2D", "Downsample", "Upsample"})
# DoRA is an attention LoRA with magnitudes: it selects like lierla (the UI offers it the same blocks)
_CONTAINERS = {"lierla": _TRANSFORMERS, "dora": _TRANSFORMERS}
_FULL_CONTAINERS = _TRANSFORMERS | _RESNETS | _SAMPLERS
_TE_LEAF = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))$")
_ELEMENT_SEGMENT = {"CrossAttention": "attn2", "SelfAttention": "attn1"}


@dataclass(frozen=True)
class Target:
    """One module that receives an adapter.

    Attributes:
        kohya_name: the save name (``lora_unet_…`` / ``lora_te1_text_model_…``).
        module: the Linear or Conv2d.
        component: ``"unet"`` or the text encoder's kohya prefix (``lora_te``, ``lora_te1``, ``lora_te2``).
        path: the module path inside its root, in the bundle's layout.
        block: block ID (``BASE`` for text encoders).
        kind: ``linear``, ``conv1x1`` or ``conv`` (kernel > 1).
        rank: adapter rank.
        alpha: adapter alpha.
        aliases: other kohya names that mean this module (the other U-Net layout, TE names without
            ``text_model_``), accepted when loading files.
    """

    kohya_name: str
    module: nn.Module = field(compare=False, repr=False)
    component: str
    path: str
    block: str
    kind: str
    rank: int
    alpha: float
    aliases: tuple[str, ...] = ()
    save_name: str = ""  # the saved key prefix when it differs from kohya_name (DiT families)


@dataclass(frozen=True)
class SelectionReport:
    """The result of :func:`select_targets`.

    Attributes:
        targets: selected modules in model order (U-Net first, then text encoders).
        counts: selected module count per block ID.
        unavailable: selected block IDs with no module of this network type in this model.
        warnings: one line per unavailable block, for the user.
    """

    targets: tuple[Target, ...]
    counts: dict[str, int]
    unavailable: tuple[str, ...]
    warnings: tuple[str, ...]

    def summary(self) -> str:
        """E.g. ``U-Net 192 modules (128 linear, 64 conv), TE 72``."""
        return summarize(self.targets)


def summarize(targets: tuple[Target, ...] | list[Target]) -> str:
    """One-line module count summary of ``targets``."""
    unet = [t for t in targets if t.component == "unet"]
    linear = sum(t.kind == "linear" for t in unet)
    text = f"U-Net {len(unet)} modules ({linear} linear, {len(unet) - linear} conv)"
    num_te = len(targets) - len(unet)
    return text + (f", TE {num_te}" if num_te else "")


def _kind(module: nn.Module) -> str:
    """linear / conv1x1 / conv (k > 1)."""
    if is_linear(module):
        return "linear"
    return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"


def _unet_leaves(unet: nn.Module, containers: frozenset[str]) -> Iterator[tuple[str, nn.Module]]:
    """(path, leaf) for every Linear/Conv2d inside a matching container."""
    seen: set[int] = set()
    for name, container in unet.named_modules():
        if type(container).__name__ not in containers:
            continue
        for sub, leaf in container.named_modules():
            if sub and (is_linear(leaf) or isinstance(leaf, nn.Conv2d)) and id(leaf) not in seen:
                seen.add(id(leaf))
                yield f"{name}.{sub}" if name else sub, leaf


def _unet_names(bundle: Any, path: str) -> tuple[str, str, tuple[str, ...]]:
    """(ldm path, kohya save name, alias names) of a U-Net module path in the bundle's layout."""
    shape = bundle.unet_shape
    if bundle.layout == "diffusers":
        diffusers_path, ldm_path = path, names.diffusers_to_ldm(path, shape)
    else:
        diffusers_path, ldm_path = names.ldm_to_diffusers(path, shape), path
    sgm = names.kohya_name("lora_unet", ldm_path)
    diffusers = names.kohya_name("lora_unet", diffusers_path)
    # kohya convention: SDXL in sgm layout, SD1/SD2 in diffusers layout (design decision 4)
    if _family_value(bundle) == "sdxl":
        return ldm_path, sgm, (diffusers,)
    return ldm_path, diffusers, (sgm,)


def _family_value(bundle: Any) -> str:
    return getattr(bundle.family, "value", str(bundle.family))


def _family_label(bundle: Any) -> str:
    return _family_value(bundle).upper()


def _element_ok(path: str, element: str) -> bool:
    """Element filter: attn1/attn2 are path segments in both U-Net layouts; CLIP paths have neither."""
    segment = _ELEMENT_SEGMENT.get(element)
    return segment is None or segment in path.split(".")


def candidate_targets(bundle: Any, spec: NetworkSpec) -> Iterator[Target]:
    """Every module ``spec.network_type`` adapts, before the block and element filters.

    Args:
        bundle: the ModelBundle.
        spec: only ``network_type`` and the ranks/alphas are used.

    Yields:
        Targets in model order: U-Net, then each text encoder.
    """
    if getattr(bundle, "layout", "") == "dit":
        yield from _dit_targets(bundle, spec)
        return
    containers = _CONTAINERS.get(spec.network_type, _FULL_CONTAINERS)
    for path, leaf in _unet_leaves(bundle.unet, containers):
        ldm_path, kohya, aliases = _unet_names(bundle, path)
        kind = _kind(leaf)
        rank, alpha = spec.rank_alpha(kind)
        yield Target(kohya, leaf, "unet", path, names.block_id(ldm_path), kind, rank, alpha, aliases)
    for prefix, encoder in bundle.text_encoders.items():
        for path, leaf in encoder.named_modules():
            if is_linear(leaf) and _TE_LEAF.search(path):
                full = names.hf_clip_path(path)
                kohya = names.kohya_name(prefix, full)
                short = names.kohya_name(prefix, full[len("text_model.") :])
                rank, alpha = spec.rank_alpha("linear")
                yield Target(kohya, leaf, prefix, path, "BASE", "linear", rank, alpha, (short,))


def _dit_targets(bundle: Any, spec: NetworkSpec) -> Iterator[Target]:
    """A DiT's attention and MLP linears (every network type: DiTs have no convolutions to add). They
    form one block, ``DIT``: the U-Net's IN/MID/OUT blocks do not exist in a transformer stack."""
    from trainer.models.dit_keys import dit_leaf, dit_names

    family = _family_value(bundle)
    rank, alpha = spec.rank_alpha("linear")
    for path, leaf in bundle.unet.named_modules():
        if is_linear(leaf) and dit_leaf(family, path):
            name, saved = dit_names(family, path)
            aliases = (saved,) if saved != name else ()
            yield Target(name, leaf, "unet", path, DIT_BLOCK, "linear", rank, alpha, aliases, saved)


DIT_BLOCK = "DIT"


def _block_ok(block: str, selected: set[str]) -> bool:
    """DiT modules train whenever any denoiser block is selected (BASE alone selects none)."""
    return block in selected or (block == DIT_BLOCK and bool(selected - {"BASE"}))


def _existing_blocks(bundle: Any) -> set[str]:
    """Block IDs of every Linear/Conv2d in the U-Net (to tell 'no such block' from 'nothing to adapt')."""
    found = set()
    for path, module in bundle.unet.named_modules():
        if is_linear(module) or isinstance(module, nn.Conv2d):
            try:
                ldm = names.diffusers_to_ldm(path, bundle.unet_shape) if bundle.layout == "diffusers" else path
            except KeyError:
                continue
            found.add(names.block_id(ldm))
    return found


def _unavailable_warnings(bundle: Any, spec: NetworkSpec, available: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Selected blocks this model cannot serve, and (unless every block was selected) one line per reason."""
    if DIT_BLOCK in available:  # a DiT: U-Net block choices do not apply (documented in network_blocks)
        return (), ()
    missing = tuple(b for b in spec.blocks if b not in available)
    if set(spec.blocks) >= set(BLOCK_IDS):
        return missing, ()  # the default "all blocks" is not a choice worth warning about
    existing = _existing_blocks(bundle)
    family = _family_label(bundle)
    absent = [b for b in missing if b != "BASE" and b not in existing]
    empty = [b for b in missing if b != "BASE" and b in existing]
    lines = []
    if "BASE" in missing:
        lines.append("BASE: this model exposes no text encoder to train")
    if absent:
        lines.append(f"{', '.join(absent)} {'does' if len(absent) == 1 else 'do'} not exist in {family}")
    if empty:
        lines.append(f"{', '.join(empty)}: no modules that {spec.network_type} adapts in {family}")
    return missing, tuple(lines)


def select_targets(bundle: Any, spec: NetworkSpec) -> SelectionReport:
    """Select the modules of ``bundle`` that ``spec`` adapts.

    Args:
        bundle: a ModelBundle (uses ``family``, ``layout``, ``unet_shape``, ``unet``, ``text_encoders``).
        spec: network type, ranks, blocks and element filter.

    Returns:
        The selection with per-block counts and the selected blocks this model cannot serve.

    Raises:
        SettingsError: ``network_blocks`` when nothing is selected.
    """
    selected = set(spec.blocks)
    all_targets = list(candidate_targets(bundle, spec))
    chosen = [t for t in all_targets if _block_ok(t.block, selected) and _element_ok(t.path, spec.element)]
    kohya_names = [t.kohya_name for t in chosen]
    assert len(set(kohya_names)) == len(kohya_names), "duplicate kohya names in selection"
    unavailable, warnings = _unavailable_warnings(bundle, spec, {t.block for t in all_targets})
    if not chosen:
        raise SettingsError(
            "network_blocks",
            f"{spec.network_type} with element {spec.element} selects no module of this "
            f"{_family_label(bundle)} model in blocks {', '.join(spec.blocks) or '(none)'}; select more blocks "
            f"(attention blocks for lierla) or element Full",
        )
    counts = Counter(t.block for t in chosen)
    ordered = {b: counts[b] for b in BLOCK_IDS if b in counts}
    return SelectionReport(tuple(chosen), ordered, unavailable, warnings)

