"""Forward patching that stacks: one instance ``forward`` per base module, a list of adapters under it.

The base module gets an instance attribute ``forward`` that calls ``type(module).forward`` looked up on
*every* call, so class-level patches a host installs later (A1111's Lora extension patches
``nn.Linear.forward``) still run underneath (reference/webui-inplace.md §2). Adapters are kept in a
per-module list, so two networks on the same modules (Difference copier + pass 2) attach and detach
in any order, and the module's original instance forward (if any) comes back exactly.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

_PATCHES = "_traintrain_patches"
_PREVIOUS = "_traintrain_previous_forward"
_WRAPPER = "_traintrain_wrapper"
_NONE = object()


class DeltaSource(Protocol):
    """What the patch list needs from an adapter."""

    multiplier: float

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor: ...


def _make_forward(module: nn.Module, previous: Any, patches: list[DeltaSource]) -> Any:
    """Build the instance forward: base output plus every attached adapter's delta."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if previous is _NONE:
            out = type(module).forward(module, x, *args, **kwargs)
        else:
            out = previous(x, *args, **kwargs)
        for patch in patches:
            # multiplier 0 is the base model: skipping keeps it exact and saves the adapter's compute
            if patch.multiplier != 0:
                out = out + patch.forward_delta(x).to(out.dtype)
        return out

    return forward


def add_patch(module: nn.Module, patch: DeltaSource) -> None:
    """Append ``patch`` to ``module``'s patch list, installing the instance forward on first use.

    Raises:
        AssertionError: ``patch`` is already attached to ``module``.
    """
    state = module.__dict__
    patches = state.get(_PATCHES)
    if patches is not None and "forward" not in state:
        # someone deleted our wrapper by hand: the stale list must not swallow new adapters
        for key in (_PATCHES, _PREVIOUS, _WRAPPER):
            state.pop(key, None)
        patches = None
    if patches is None:
        patches = []
        previous = state.get("forward", _NONE)
        wrapper = _make_forward(module, previous, patches)
        state[_PATCHES] = patches
        state[_PREVIOUS] = previous
        state[_WRAPPER] = wrapper
        state["forward"] = wrapper
    assert not any(p is patch for p in patches), "adapter attached twice to the same module"
    patches.append(patch)


def remove_patch(module: nn.Module, patch: DeltaSource) -> None:
    """Remove ``patch`` from ``module``; when the list empties, restore the original forward.

    If someone else wrapped our forward after us, our wrapper stays as a pass-through so their
    wrapper keeps working; it is reused by the next :func:`add_patch`.
    """
    state = module.__dict__
    patches = state.get(_PATCHES)
    if patches is None:
        return
    patches[:] = [p for p in patches if p is not patch]
    if patches or state.get("forward") is not state[_WRAPPER]:
        return
    previous = state.pop(_PREVIOUS)
    del state[_PATCHES], state[_WRAPPER]
    if previous is _NONE:
        del state["forward"]
    else:
        state["forward"] = previous


def patches_of(module: nn.Module) -> tuple[DeltaSource, ...]:
    """The adapters currently attached to ``module`` (empty when none)."""
    return tuple(module.__dict__.get(_PATCHES, ()))


def remove_all(root: nn.Module) -> int:
    """Remove every TrainTrain patch under ``root`` (host clean-up between jobs), restoring each
    module's original forward. Prefer ``Network.detach()``; this is the safety net.

    Returns:
        How many modules were restored.
    """
    count = 0
    for module in root.modules():
        state = module.__dict__
        if _PATCHES in state:
            for patch in list(state[_PATCHES]):
                if hasattr(patch, "_attached"):
                    patch._attached = False
            state[_PATCHES].clear()
            if state.get("forward") is state[_WRAPPER]:
                previous = state.pop(_PREVIOUS)
                del state[_PATCHES], state[_WRAPPER]
                state.pop("forward")
                if previous is not _NONE:
                    state["forward"] = previous
            count += 1
    return count
