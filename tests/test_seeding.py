"""detect/train/seeding.py: epoch permutations from seed + epoch, disjoint shards, start_batch, RNG snapshots."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from detect.train.seeding import DistributedEpochSampler, EpochSampler, rng_state, sample_seed, set_rng_state


def test_epoch_sampler_is_a_function_of_seed_and_epoch() -> None:
    sampler = EpochSampler(10, seed=3, batch_size=4)
    sampler.set_epoch(2)
    items = list(sampler)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert items == [(i, 2) for i in expected]
    assert len(sampler) == 10
    other = EpochSampler(10, seed=3, batch_size=4)
    other.set_epoch(2)
    assert list(other) == items  # independent of history
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != expected and sorted(i for i, _ in sampler) == list(range(10))
    unshuffled = EpochSampler(5, shuffle=False)
    assert list(unshuffled) == [(i, 0) for i in range(5)]


def test_start_batch_skips_done_batches() -> None:
    sampler = EpochSampler(10, seed=0, batch_size=4)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start_batch=2)
    assert list(sampler) == full[8:] and len(sampler) == 2
    sampler.set_epoch(1, start_batch=3)
    assert list(sampler) == [] and len(sampler) == 0


def test_distributed_shards_are_disjoint() -> None:
    shards = []
    for rank in range(3):
        sampler = DistributedEpochSampler(11, num_replicas=3, rank=rank, seed=7, batch_size=2)
        sampler.set_epoch(4)
        shards.append([i for i, e in sampler])
        assert len(sampler) == len(shards[-1]) == 3  # equal shards: 11 cut to 9
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == 9
    order = torch.randperm(11, generator=torch.Generator().manual_seed(11)).tolist()
    assert shards[1] == order[1:9:3]
    evals = [DistributedEpochSampler(11, 3, rank, shuffle=False, equal_shards=False) for rank in range(3)]
    assert sorted(i for s in evals for i, _ in s) == list(range(11))  # every sample exactly once
    assert [len(s) for s in evals] == [4, 4, 3]
    skipped = DistributedEpochSampler(11, 3, 0, seed=7, batch_size=2)
    skipped.set_epoch(4, start_batch=1)
    assert [i for i, _ in skipped] == shards[0][2:]


def test_sample_seed_distinct_and_stable() -> None:
    seeds = {sample_seed(0, e, i) for e in range(3) for i in range(100)}
    assert len(seeds) == 300
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_rng_state_round_trip_through_weights_only_load() -> None:
    state = rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(loaded)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
