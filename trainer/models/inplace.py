"""Run a model's ``x += y`` residual adds out of place, without editing its code.

Forge's and Forge Neo's U-Net (``backend/nn/unet.py``) add residuals in place (``x += n`` after each
attention, ``x += x_skip``, ``h += ctrl``) to save memory at inference. Under autograd that breaks
backward: ``norm1`` saved ``x`` for its gradient, then ``x += n`` changed it ("modified by an inplace
operation"). Python hands ``x += n`` to ``__torch_function__`` as ``Tensor.add_``, the same function an
explicit ``x.add_(n)`` calls, so the two are told apart by the caller's bytecode: only an augmented
assignment rebinds its target to whatever ``__iadd__`` returns, so only there may a new tensor be
returned instead. Explicit ``add_`` calls (whose result may be discarded) run unchanged.

Used around a training forward only (and re-entered inside checkpointed blocks, whose recomputation in
backward runs outside the caller's ``with``); inference keeps the host's in-place adds.
"""

from __future__ import annotations

import dis
import sys
from types import CodeType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# in-place method -> its out-of-place twin
_TWINS = {
    torch.Tensor.add_: torch.add,
    torch.Tensor.sub_: torch.sub,
    torch.Tensor.mul_: torch.mul,
    torch.Tensor.div_: torch.div,
}
# the bytecode of an augmented assignment: INPLACE_* up to Python 3.10, BINARY_OP "+=" etc. from 3.11
_AUGMENTED_OPS = {"INPLACE_ADD", "INPLACE_SUBTRACT", "INPLACE_MULTIPLY", "INPLACE_TRUE_DIVIDE"}
_AUGMENTED_ARGS = {"+=", "-=", "*=", "/="}
_cache: dict[tuple[CodeType, int], bool] = {}


def _is_augmented(code: CodeType, offset: int) -> bool:
    key = (code, offset)
    hit = _cache.get(key)
    if hit is None:
        hit = False
        for ins in dis.get_instructions(code):
            if ins.offset == offset:
                hit = ins.opname in _AUGMENTED_OPS or (ins.opname == "BINARY_OP" and ins.argrepr in _AUGMENTED_ARGS)
                break
        _cache[key] = hit
    return hit


class OutOfPlaceAugmented(TorchFunctionMode):
    """A torch function mode: ``x += y`` (and ``-=``, ``*=``, ``/=``) on tensors becomes ``x = x + y``.

    ``count`` tells how many statements were redirected (tests and the run log use it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        twin = _TWINS.get(func)
        if twin is not None and len(args) == 2 and not kwargs:
            caller = sys._getframe(1)
            if _is_augmented(caller.f_code, caller.f_lasti):
                self.count += 1
                return twin(*args)
        return func(*args, **kwargs)
