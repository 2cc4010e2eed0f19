"""The bucket batcher (§10.10, §10.12 with exact step counts, resume and DDP sharding)."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
import torch

from trainer.data.cache import BucketData, CachedData
from trainer.data.loader import BucketBatcher
from trainer.errors import InputError, SettingsError


def _cached(counts, num_multiply=1):
    buckets = []
    for i, n in enumerate(counts):
        w, h = 64 + 32 * i, 64
        buckets.append(BucketData((w, h), torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 8, 8),
                                  torch.ones(n, 1, 8, 8), [f"b{i}-{k}" for k in range(n)], [None] * n))
    return CachedData(buckets, num_multiply)


def _key(ref):
    return ref.bucket_index, ref.indices


def test_exact_coverage_per_epoch_and_single_bucket_batches():
    cached = _cached([5, 3, 1], num_multiply=1)
    b = BucketBatcher(cached, batch_size=2, seed=1)
    assert b.batches_per_epoch == 3 + 2 + 1
    epoch = list(islice(b, b.batches_per_epoch))
    assert {r.epoch for r in epoch} == {0} and b.epoch == 1
    seen = Counter((r.bucket_index, i) for r in epoch for i in r.indices)
    assert seen == Counter({**{(0, i): 1 for i in range(5)}, **{(1, i): 1 for i in range(3)}, (2, 0): 2})
    for r in epoch:
        assert r.bucket == cached.buckets[r.bucket_index].bucket
        batch = cached.gather(r.bucket_index, list(r.indices))
        assert batch.latents.shape[-2:] == (8, 8) and len(batch.captions) == len(r.indices)
    assert sorted(len(r.indices) for r in epoch if r.bucket_index == 0) == [1, 2, 2]  # last partial kept
    assert next(b).epoch == 1


def test_num_multiply_repeats_items():
    b = BucketBatcher(_cached([3], num_multiply=2), batch_size=4, seed=0)
    epoch = list(islice(b, b.batches_per_epoch))
    assert Counter(i for r in epoch for i in r.indices) == Counter({0: 2, 1: 2, 2: 2})


def test_deterministic_for_a_seed_and_reshuffled_per_epoch():
    cached = _cached([7, 4, 2])
    first = [_key(r) for r in islice(BucketBatcher(cached, 2, seed=5), 40)]
    assert first == [_key(r) for r in islice(BucketBatcher(cached, 2, seed=5), 40)]
    assert first != [_key(r) for r in islice(BucketBatcher(cached, 2, seed=6), 40)]
    per_epoch = BucketBatcher(cached, 2, seed=5).batches_per_epoch
    assert first[:per_epoch] != first[per_epoch:2 * per_epoch]


def test_state_dict_resume_gives_identical_continuation():
    cached = _cached([7, 4, 2])
    straight = BucketBatcher(cached, 3, seed=9)
    expected = [_key(r) for r in islice(straight, 25)]
    part = BucketBatcher(cached, 3, seed=9)
    head = [_key(r) for r in islice(part, 11)]
    resumed = BucketBatcher(cached, 3, seed=9)
    resumed.load_state_dict(part.state_dict())
    assert head + [_key(r) for r in islice(resumed, 14)] == expected
    with pytest.raises(ValueError, match="seed"):
        BucketBatcher(cached, 3, seed=10).load_state_dict(part.state_dict())


def test_two_rank_sharding_is_disjoint_and_complete():
    cached = _cached([7, 4, 2])
    single = [_key(r) for r in islice(BucketBatcher(cached, 2, seed=3), 30)]
    ranks = [list(islice(BucketBatcher(cached, 2, seed=3, rank=r, world_size=2), 15)) for r in (0, 1)]
    assert [_key(r) for r in ranks[0]] == single[0::2] and [_key(r) for r in ranks[1]] == single[1::2]
    per_epoch = BucketBatcher(cached, 2, seed=3).batches_per_epoch  # 4 + 2 + 1 = 7: ranks get 4 and 3
    shares = [Counter((r.bucket_index, i) for r in refs if r.epoch == 0 for i in r.indices) for refs in ranks]
    whole = Counter((b, i) for b, idx in single[:per_epoch] for i in idx)
    assert shares[0] + shares[1] == whole and sum(whole.values()) == 7 + 4 + 2
    assert not shares[0] & shares[1]  # each item appears once per epoch, so any overlap is a double use


def test_bad_arguments():
    with pytest.raises(SettingsError):
        BucketBatcher(_cached([2]), 0, seed=0)
    with pytest.raises(InputError):
        BucketBatcher(CachedData([], 1), 2, seed=0)
    with pytest.raises(ValueError):
        BucketBatcher(_cached([2]), 2, seed=0, rank=2, world_size=2)
