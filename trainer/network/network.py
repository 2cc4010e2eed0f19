"""``Network``: a set of adapters over a bundle, attached by forward patches, saved in kohya format."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.models.dit_keys import split_key
from trainer.network.adapter import Adapter
from trainer.network.dora import DoRAModule
from trainer.network.loha import LoHaModule
from trainer.network.lokr import LoKrModule
from trainer.network.lora import LoRAModule
from trainer.network.select import SelectionReport, Target, select_targets, summarize
from trainer.network.spec import NetworkSpec

ALGORITHMS: dict[str, type[Adapter]] = {
    "lierla": LoRAModule,
    "c3lier": LoRAModule,
    "loha": LoHaModule,
    "lokr": LoKrModule,
    "dora": DoRAModule,
}


@dataclass(frozen=True)
class LoadReport:
    """What :meth:`Network.load_kohya_state_dict` did.

    Attributes:
        matched: adapter names whose tensors were all loaded.
        missing: adapter tensor keys the file lacks.
        unexpected: file keys that name no adapter of this network.
        shape_mismatch: ``key: file shape vs network shape`` for tensors that did not fit (their adapter
            was left unchanged).
    """

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatch: tuple[str, ...]


class Network(nn.Module):
    """Adapters keyed by kohya name, plus the selection that produced them.

    Args:
        adapters: kohya name -> adapter.
        spec: the spec the network was built from (for metadata).
        targets: the selected modules (same order as ``adapters``).
        report: the selection report (None for networks read from a file).
    """

    def __init__(
        self, adapters: dict[str, Adapter], spec: NetworkSpec, targets: tuple[Target, ...], report: SelectionReport | None
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self.spec = spec
        self.targets = targets
        self.report = report
        self._components = {t.kohya_name: t.component for t in targets}
        self._aliases = {alias: t.kohya_name for t in targets for alias in (t.kohya_name, *t.aliases)}
        self._saved = {t.kohya_name: t.save_name for t in targets if t.save_name}
        self.load_report: LoadReport | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        """Selection warnings for the user (selected blocks this model cannot serve)."""
        return self.report.warnings if self.report is not None else ()

    # -- patching -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Patch every adapter into its module's forward (idempotent)."""
        for adapter in self.adapters.values():
            adapter.attach()

    def detach(self) -> None:
        """Remove this network's patches (other networks on the same modules stay)."""
        for adapter in reversed(list(self.adapters.values())):
            adapter.detach()

    def set_multiplier(self, multiplier: float) -> None:
        """Set every adapter's multiplier (0 = base model, exactly)."""
        for adapter in self.adapters.values():
            adapter.multiplier = float(multiplier)

    @contextlib.contextmanager
    def scaled(self, multiplier: float) -> Iterator[Network]:
        """Run a block with every multiplier set to ``multiplier``; the previous values come back after."""
        previous = [a.multiplier for a in self.adapters.values()]
        try:
            self.set_multiplier(multiplier)
            yield self
        finally:
            for adapter, value in zip(self.adapters.values(), previous, strict=True):
                adapter.multiplier = value

    @contextlib.contextmanager
    def frozen(self) -> Iterator[Network]:
        """Run a block with every adapter parameter frozen; ``requires_grad`` flags come back after."""
        params = list(self.parameters())
        previous = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            yield self
        finally:
            for p, flag in zip(params, previous, strict=True):
                p.requires_grad_(flag)

    # -- training -------------------------------------------------------------------------------
    def param_groups(self, unet_lr: float, te_lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer groups with names: ``textencoder`` first (when present), then ``unet``.

        Args:
            unet_lr: U-Net learning rate.
            te_lr: text-encoder learning rate; falsy means ``unet_lr`` (reference §8.7).

        Returns:
            ``[{"name", "params", "lr"}, ...]``; groups without parameters are left out.
        """
        split: dict[str, list[nn.Parameter]] = defaultdict(list)
        for name, adapter in self.adapters.items():
            key = "unet" if self._components.get(name, "unet") == "unet" else "textencoder"
            split[key].extend(p for p in adapter.parameters() if p.requires_grad)
        groups = [
            {"name": "textencoder", "params": split["textencoder"], "lr": te_lr or unet_lr},
            {"name": "unet", "params": split["unet"], "lr": unet_lr},
        ]
        return [g for g in groups if g["params"]]

    def summary(self) -> str:
        """E.g. ``U-Net 192 modules (128 linear, 64 conv), TE 72``."""
        return summarize(self.targets)

    @torch.no_grad()
    def apply_to_weights(self, sign: float = 1.0) -> None:
        """Merge ``sign · multiplier · ΔW`` into every base weight (``-1`` undoes a previous merge)."""
        for adapter in self.adapters.values():
            adapter.merge_into_base(sign)

    # -- kohya state dicts --------------------------------------------------------------------------
    @torch.no_grad()
    def kohya_state_dict(self, dtype: torch.dtype = torch.float16, strength: float = 1.0) -> dict[str, torch.Tensor]:
        """Adapter tensors under kohya keys (``<name>.lora_down.weight`` …), on CPU in ``dtype``.

        Args:
            dtype: save precision.
            strength: ``network_strength``: the saved ΔW is ``strength`` times the trained one.
        """
        out: dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters.items():
            tensors = {k: v.detach().float() for k, v in adapter.state_dict().items()}
            if strength != 1.0:
                tensors = adapter.scale_for_strength(tensors, strength)
            saved = self._saved.get(name, name)  # DiT families save under the key their loaders map
            out.update({f"{saved}.{k}": v.to("cpu", dtype).contiguous() for k, v in tensors.items()})
        return out

    @torch.no_grad()
    def load_kohya_state_dict(self, state_dict: dict[str, torch.Tensor], strength: float = 1.0) -> LoadReport:
        """Load kohya-keyed tensors into the adapters (either U-Net layout, TE names with or without
        ``text_model_``). An adapter is loaded only when all its tensors are present and fit.

        Args:
            state_dict: the file's tensors.
            strength: the ``network_strength`` the file was saved with: it is taken out again, so the
                network holds the trained weights and saving it at that strength gives the same file.
        """
        by_adapter: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        unexpected = []
        for key, tensor in state_dict.items():
            module_name, suffix = split_key(key)
            name = self._aliases.get(module_name)
            if name is None or name not in self.adapters:
                unexpected.append(key)
            else:
                by_adapter[name][suffix] = tensor
        matched, missing, mismatch = [], [], []
        for name, adapter in self.adapters.items():
            tensors = by_adapter.get(name, {})
            if strength != 1.0 and tensors:
                tensors = adapter.scale_for_strength({k: v.float() for k, v in tensors.items()}, 1.0 / strength)
            ok = _load_adapter(adapter, tensors, missing, mismatch, unexpected)
            if ok:
                matched.append(name)
        self.load_report = LoadReport(tuple(matched), tuple(missing), tuple(unexpected), tuple(mismatch))
        return self.load_report


def _load_adapter(adapter: Adapter, tensors: dict[str, torch.Tensor], missing: list, mismatch: list, unexpected: list) -> bool:
    """Copy ``tensors`` into ``adapter`` if all keys are there and every shape fits; record problems."""
    own = adapter.state_dict()
    name = adapter.kohya_name
    unexpected.extend(f"{name}.{k}" for k in tensors if k not in own)
    absent = [k for k in own if k not in tensors]
    missing.extend(f"{name}.{k}" for k in absent)
    bad = [k for k in own if k in tensors and _core_shape(tensors[k]) != _core_shape(own[k])]
    mismatch.extend(f"{name}.{k}: file {tuple(tensors[k].shape)} vs network {tuple(own[k].shape)}" for k in bad)
    if absent or bad:
        return False
    for key, target in own.items():
        target.copy_(tensors[key].reshape(target.shape).to(target.dtype))
    adapter.refresh_scale()
    return True


def _core_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """Shape without trailing 1×1 kernel dims, so Linear and 1×1-conv files are interchangeable
    (SD1 proj_in is a 1×1 conv, SD2/SDXL's a Linear; kohya loaders reshape the same way)."""
    shape = tuple(tensor.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape if tensor.numel() != 1 else ()


def build_network(
    bundle: Any, spec: NetworkSpec, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Network:
    """Select modules per ``spec`` and create one fresh adapter on each (not attached yet).

    Args:
        bundle: the ModelBundle to adapt.
        spec: network type, ranks, blocks, element.
        dtype: adapter parameter dtype (fp32 for training).
        device: adapter device (default: each base module's device).

    Returns:
        The network; ``network.report`` holds counts and unavailable-block warnings.

    Raises:
        SettingsError: nothing selected (``network_blocks``).
    """
    report = select_targets(bundle, spec)
    cls = ALGORITHMS[spec.network_type]
    extra: dict[str, Any] = {"factor": spec.factor} if cls is LoKrModule else {}
    adapters = {
        t.kohya_name: cls(t.kohya_name, t.module, t.rank, t.alpha, dtype=dtype, device=device, **extra)
        for t in report.targets
    }
    return Network(adapters, spec, report.targets, report)
