"""Data-parallel training under ``torchrun`` (standalone/CLI only; the Web-UI process is single-GPU).

``torchrun --nproc_per_node=N -m trainer train …`` starts N copies of the train command. Each copy
joins a process group from the torchrun environment (``gloo`` on CPU, ``nccl`` on CUDA with one GPU
per local rank) and runs the same job with:

- the same seed everywhere (a negative ``train_seed`` is drawn once on rank 0 and broadcast), so the
  adapters start identical;
- its own shard of the bucketed batches (rank r takes global batches r, r+N, …) and its own noise
  stream (``RunContext.generator`` is offset by the rank);
- after every backward, the adapter gradients **averaged over the ranks** in one flat all-reduce
  (the adapters are not registered in the U-Net, so there is nothing for DDP to wrap: a manual
  all-reduce of the trainable parameters' gradients is the whole of it);
- a stop request (Ctrl+C) agreed by all ranks at the end of each step, so no rank waits forever in an
  all-reduce its peers have left;
- only rank 0 writes files and logs.

At the end the ranks compare a checksum of their adapters; ``in_sync`` in the result says whether they
are still identical (they must be: same start, same averaged gradients, same optimizer).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def env_world_size(environ: dict[str, str] | None = None) -> int:
    """``WORLD_SIZE`` from the torchrun environment (1 when not launched by torchrun)."""
    env = os.environ if environ is None else environ
    try:
        return max(int(env.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def average_gradients(params: list[torch.Tensor], all_reduce: Callable[[torch.Tensor], None], world_size: int) -> int:
    """Replace every ``p.grad`` with its mean over the ranks, through one flat float32 all-reduce.

    Args:
        params: the trainable parameters, in the same order on every rank. Parameters without a
            gradient are skipped; every rank runs the same code, so they are the same on all ranks.
        all_reduce: sums a tensor in place over the ranks (``torch.distributed.all_reduce``).
        world_size: the number of ranks.

    Returns:
        The number of gradient elements reduced.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0
    # one message instead of hundreds of small ones; float32 so bf16 adapters average without loss
    flat = torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads])
    all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
    return offset


def params_checksum(params: list[torch.Tensor]) -> torch.Tensor:
    """(sum, sum of squares, position-weighted sum) in float64: equal on ranks with equal params,
    and different after a change of any value or of the order."""
    total = torch.zeros(3, dtype=torch.float64)
    offset = 0
    for p in params:
        x = p.detach().double().cpu().reshape(-1)
        weights = (torch.arange(offset, offset + x.numel(), dtype=torch.float64) % 1009) + 1
        total += torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()])
        offset += x.numel()
    return total


@dataclass
class DataParallel:
    """One rank of a torchrun job (or the single process: ``world_size`` 1, every method a no-op).

    Attributes:
        rank, world_size, local_rank: from the torchrun environment.
        device: where this rank trains (``cuda:<local_rank>`` on CUDA, else the user's choice or None).
        backend: ``gloo`` or ``nccl`` (empty for one process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    backend: str = ""
    _params: list[torch.Tensor] = field(default_factory=list, repr=False)
    reduced_elements: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_sync(self) -> Callable[[list[torch.Tensor]], None] | None:
        """The ``after_backward`` hook for ``run_job`` (None for one process)."""
        return self._grad_sync if self.active else None

    def _grad_sync(self, params: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        self._params = params
        self.reduced_elements = average_gradients(params, dist.all_reduce, self.world_size)

    def wrap_stop(self, stop: Callable[[], str | None]) -> Callable[[], str | None]:
        """A stop check all ranks agree on: the strongest request of any rank (save < stop)."""
        if not self.active:
            return stop
        import torch.distributed as dist

        codes = {None: 0, "save": 1, "stop": 2}
        names = {v: k for k, v in codes.items()}

        def synced() -> str | None:
            flag = torch.tensor([codes.get(stop(), 2)], dtype=torch.int32, device=self._comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return names[int(flag.item())]

        return synced

    def agree_seed(self, settings):
        """Settings with one seed for all ranks: a negative (random) seed is drawn on rank 0 and broadcast."""
        if not self.active or int(settings.train_seed) >= 0:
            return settings
        import torch.distributed as dist

        value = torch.tensor([random.SystemRandom().randrange(0, 2**31) if self.is_main else 0], dtype=torch.int64,
                             device=self._comm_device())
        dist.broadcast(value, src=0)
        return settings.replace(train_seed=int(value.item()))

    def check_sync(self) -> dict[str, Any]:
        """Compare the adapters of all ranks after training (one all-gather of a 3-number checksum).

        Returns:
            ``{"world_size", "rank", "backend", "in_sync", "max_checksum_diff"}``.
        """
        report: dict[str, Any] = {"world_size": self.world_size, "rank": self.rank, "backend": self.backend}
        if not self.active:
            return report
        import torch.distributed as dist

        mine = params_checksum(self._params).to(self._comm_device())
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        report.update(in_sync=diff == 0.0, max_checksum_diff=diff, trained_params=len(self._params))
        return report

    def close(self, succeeded: bool = False) -> None:
        """Leave the process group.

        After a success every rank first meets in a barrier, so none tears its connections down while
        a peer is still inside a collective or writing files (a rank leaving early can abort its peer
        in gloo's teardown, and torchrun then reports the whole job failed). After a failure there is
        no barrier: the failed rank's peers would wait in it forever (torchrun ends them itself).
        """
        if not self.active:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if succeeded:
                dist.barrier()
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return torch.device(self.device) if self.backend == "nccl" and self.device else torch.device("cpu")


def from_env(device: str | None = None, environ: dict[str, str] | None = None) -> DataParallel:
    """Join the torchrun process group described by the environment, or return the one-process context.

    Args:
        device: the user's ``--device``; on CUDA each rank takes ``cuda:<LOCAL_RANK>`` (a given
            ``cuda`` is refined the same way), on CPU every rank uses the CPU.

    Raises:
        SettingsError: a device that cannot host one rank per GPU.
    """
    from trainer.errors import SettingsError

    env = dict(os.environ if environ is None else environ)
    world = env_world_size(env)
    if world == 1:
        return DataParallel(device=device)
    import torch.distributed as dist

    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    wants_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if wants_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise SettingsError("device", f"rank {rank} needs GPU {local_rank} but {torch.cuda.device_count()} are visible; "
                                          "start at most one process per GPU (--nproc_per_node)")
        device, backend = f"cuda:{local_rank}", "nccl"
        torch.cuda.set_device(local_rank)
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DataParallel(rank, world, local_rank, device, backend)
