"""Seeds, per-sample random streams, epoch samplers and RNG snapshots: what makes a run repeatable and resumable.

Randomness in a run comes from three places, each made a function of (seed, epoch, ...):
  - the order of samples: `EpochSampler` / `DistributedEpochSampler` draw the epoch's permutation from
    `torch.Generator().manual_seed(seed + epoch)`, so it does not depend on what ran before;
  - augmentation: a dataset receives `(index, epoch)` and seeds its transforms from `sample_seed(seed, epoch, index)`
    (`SeededSamples` in detect/train/classify.py), so worker processes and resumes do not change any image;
  - the model (initialisation, dropout): the global torch RNG, saved in checkpoints by `rng_state()`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch, well mixed (NumPy SeedSequence) and independent of order."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """The global generators' states as checkpoint-safe data (tensors, lists, numbers: loads with weights_only)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured (the CUDA part only where CUDA is there and the device count matches)."""
    torch.set_rng_state(state["torch"])
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class DistributedEpochSampler(Sampler[tuple[int, int]]):
    """Yields `(index, epoch)` for this rank's share of an epoch, in a permutation fixed by (seed, epoch).

    The epoch's order is `torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))`
    (identity without shuffle). Rank r takes positions r, r + W, r + 2W, ... (W = num_replicas), so shards are
    disjoint. With `equal_shards` (training) the order is first cut to a multiple of W so that every rank runs the
    same number of batches (DDP needs it; a different tail is cut each epoch); without it (evaluation) every sample is
    seen exactly once and shards differ by at most one.

    Args:
        num_samples: data set length.
        num_replicas, rank: world size and this process's rank.
        seed: base seed.
        shuffle: permute each epoch.
        batch_size: per-process batch size, used to skip `start_batch` batches.
        equal_shards: cut the tail so all shards have the same length.
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        equal_shards: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.equal_shards = equal_shards
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate, skipping its first `start_batch` batches (already done before a resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def shard(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order, before skipping."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.equal_shards:
            order = order[: len(order) - len(order) % self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.shard(self.epoch)[self.start_batch * self.batch_size :]
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        total = self.num_samples - (self.num_samples % self.num_replicas if self.equal_shards else 0)
        mine = len(range(self.rank, total, self.num_replicas))
        return max(mine - self.start_batch * self.batch_size, 0)


class EpochSampler(DistributedEpochSampler):
    """Single-process `DistributedEpochSampler`: the whole epoch, `(index, epoch)` tuples."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, batch_size: int = 1) -> None:
        super().__init__(num_samples, 1, 0, seed, shuffle, batch_size, equal_shards=True)
