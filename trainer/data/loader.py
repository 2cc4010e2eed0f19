"""The bucket batcher: single-bucket batches, every batch once per epoch, endless, resumable, shardable.

Each epoch's batch order is a pure function of ``(seed, epoch)`` (its own ``torch.Generator``), and all
epochs together form one endless global stream. Rank ``r`` of ``W`` takes stream positions r, r+W, …,
so ranks share every epoch disjointly and completely, and the resume state is just the stream position.
The trainer pulls exactly the number of batches it needs; no epoch is run to its end (§17 #3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import InputError, SettingsError
from .buckets import Bucket


class _Buckets(Protocol):
    """What the batcher needs from :class:`CachedData` / :class:`CachedPairs` / :class:`PlannedCounts`."""

    num_multiply: int
    buckets: list

    def item_repeats(self) -> list[list[int]]: ...

    def item_is_reg(self) -> list[list[bool]]: ...


@dataclass(frozen=True)
class BatchRef:
    """Which items form one batch; ``cached.gather(ref.bucket_index, ref.indices)`` makes the tensors.

    Attributes:
        bucket_index: index into ``cached.buckets``.
        bucket: ``(width, height)`` of that bucket.
        indices: item indices inside the bucket.
        epoch: the epoch this batch belongs to (0-based).
    """

    bucket_index: int
    bucket: Bucket
    indices: tuple[int, ...]
    epoch: int


class BucketBatcher:
    """Endless iterator of :class:`BatchRef`.

    Within an epoch each bucket's items (each repeated its own repeats × ``num_multiply`` times; a bucket
    smaller than the batch repeated ``batch_size`` times, as §10.10) are shuffled and cut into batches, the
    last one possibly short; the next batch comes from a bucket picked uniformly among those not yet
    exhausted (§10.12). Regularization items join the shuffle as kohya mixes them: per epoch as many reg
    samples as training samples, each bucket taking its share and rotating through its reg pool.

    Args:
        cached: encoded (or planned) data with ``item_repeats()``, ``item_is_reg()``, ``num_multiply`` and
            ``buckets[i].bucket``.
        batch_size: ``train_batch_size``.
        seed: the run seed; same seed, same batches.
        rank: this process's rank for DDP.
        world_size: number of DDP processes.

    Raises:
        SettingsError: for a batch size below 1.
        InputError: when there is no data at all.
        ValueError: for a rank outside ``[0, world_size)``.
    """

    def __init__(self, cached: _Buckets, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise SettingsError("train_batch_size", f"{batch_size} must be 1 or more")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        multiply = cached.num_multiply
        repeats, is_reg = cached.item_repeats(), cached.item_is_reg()
        # per bucket: (item, repeats) of training items; image_num_multiply applies to them only
        self._train = [[(i, r * multiply) for i, (r, reg) in enumerate(zip(rs, regs, strict=True)) if not reg]
                       for rs, regs in zip(repeats, is_reg, strict=True)]
        pools = [[i for rep in range(max(rs, default=0)) for i, (r, reg) in enumerate(zip(rs, regs, strict=True))
                  if reg and r > rep] for rs, regs in zip(repeats, is_reg, strict=True)]
        n_train = sum(r for items in self._train for _, r in items)
        if not n_train:
            raise InputError("lora_data_directory", "no encoded samples to train on; add images to the folder")
        self._reg_pools, self._reg_take = pools, _share(n_train, [len(p) for p in pools])
        self._counts = [sum(r for _, r in items) + take for items, take in zip(self._train, self._reg_take, strict=True)]
        self._buckets = [tuple(b.bucket) for b in cached.buckets]  # type: ignore[attr-defined]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.batches_per_epoch = sum(self._bucket_batches(n) for n in self._counts)
        self._next = rank  # global stream position of this rank's next batch
        self._plan_epoch, self._plan = -1, []

    def _bucket_batches(self, n: int) -> int:
        """Batches one bucket gives per epoch (a short bucket is repeated to fill whole batches)."""
        return n if 0 < n < self.batch_size else -(-n // self.batch_size)

    @property
    def epoch(self) -> int:
        """Completed epochs of the global stream before this rank's next batch."""
        return self._next // self.batches_per_epoch

    @property
    def current_epoch(self) -> int:
        """1-based epoch of the batch this rank drew last (0 before the first), for progress displays."""
        drawn = self._next - self.world_size
        return 0 if drawn < 0 else drawn // self.batches_per_epoch + 1

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank draws per epoch, rounded up (the global count divided among the ranks)."""
        return -(-self.batches_per_epoch // self.world_size)

    def __iter__(self) -> BucketBatcher:
        return self

    def __next__(self) -> BatchRef:
        epoch, offset = divmod(self._next, self.batches_per_epoch)
        self._next += self.world_size
        return self._epoch_batches(epoch)[offset]

    def _epoch_batches(self, epoch: int) -> list[BatchRef]:
        """The global batch order of ``epoch``, built once and kept until the next epoch."""
        if epoch != self._plan_epoch:
            self._plan_epoch, self._plan = epoch, self._build_epoch(epoch)
        return self._plan

    def _build_epoch(self, epoch: int) -> list[BatchRef]:
        """Shuffle each bucket, cut batches, then interleave by picking random non-exhausted buckets."""
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        queues: list[list[tuple[int, ...]]] = []
        for train, pool, take in zip(self._train, self._reg_pools, self._reg_take, strict=True):
            # repeats laid out round by round: with equal repeats this is range(n) * repeats, as before
            items = [i for rep in range(max((r for _, r in train), default=0)) for i, r in train if r > rep]
            # this bucket's share of reg samples, rotating through its reg pool from epoch to epoch
            items += [pool[(epoch * take + k) % len(pool)] for k in range(take)]
            if 0 < len(items) < self.batch_size:
                items = items * self.batch_size
            order = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
            queues.append([tuple(order[s:s + self.batch_size]) for s in range(0, len(order), self.batch_size)])
        out, heads = [], [0] * len(queues)
        active = [i for i, q in enumerate(queues) if q]
        while active:
            pick = active[int(torch.randint(len(active), (1,), generator=gen))]
            out.append(BatchRef(pick, self._buckets[pick], queues[pick][heads[pick]], epoch))
            heads[pick] += 1
            if heads[pick] == len(queues[pick]):
                active.remove(pick)
        return out

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue with the identical next batch.

        The per-epoch generators are derived from ``(seed, epoch)``, so seed and stream position are the
        whole state; ``next_global`` is rank-independent, so a resume may change ``world_size``.
        """
        return {"seed": self.seed, "next_global": self._next - self.rank,
                "batches_per_epoch": self.batches_per_epoch, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`.

        Raises:
            ValueError: if the seed, batch size or dataset layout differ (the continuation would not match).
        """
        mine = self.state_dict()
        for key in ("seed", "batch_size", "batches_per_epoch"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"batcher state has {key}={state[key]}, this run has {mine[key]}; "
                                 "the dataset or settings changed since the state was saved")
        self._next = int(state["next_global"]) + self.rank


def _share(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` reg samples per epoch over buckets in proportion to their reg pools (largest
    remainder), so every epoch has exactly one reg sample per training sample and every reg image is used."""
    pool = sum(sizes)
    if not pool:
        return [0] * len(sizes)
    exact = [total * n / pool for n in sizes]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch), stable across Python and torch versions."""
    digest = hashlib.sha256(f"traintrain-batcher:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
