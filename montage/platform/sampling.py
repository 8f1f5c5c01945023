"""Which samples each rank sees, and the seeds of every random draw, as functions of
(seed, epoch, rank, index) only.

That makes two promises hold:

- **DDP equivalence.** ``N`` workers at batch ``b`` see, step for step, the same global batch
  of ``N·b`` samples as one worker at batch ``N·b``: one seeded permutation per epoch, cut into
  global batches, each split into ``N`` contiguous shares. Validation shards the set without
  padding (``DistributedSampler`` repeats samples to even out the ranks, and those would be
  counted twice in the all-reduced metrics).
- **Exact resume.** Augmentation draws are seeded per (seed, epoch, sample), and the torch /
  numpy / ``random`` generators per (seed, rank, epoch) at the start of each epoch, so a run
  resumed at an epoch boundary draws what the uninterrupted run drew.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def seed_for(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers (``np.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) % 2**32 for k in keys]).generate_state(1)[0])


def seed_process(seed: int) -> None:
    """Seed ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_data_epoch(dataset: Any, epoch: int) -> None:
    """Tell a dataset (and the datasets it wraps, e.g. through ``Subset``) the epoch: those with
    a ``set_epoch`` method seed their augmentation per (seed, epoch, sample). DataLoader worker
    processes are started per epoch (not persistent), so they see it too."""
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        dataset = getattr(dataset, "dataset", None)


class ShardSampler(Sampler[int]):
    """This rank's sample indices for one epoch.

    ``train`` (shuffled): a permutation seeded by (seed, epoch), cut into global batches of
    ``batch_size · world_size``; this rank takes share ``rank`` of each. Only whole global batches
    are used (every rank makes the same number of steps); a set smaller than one global batch is
    split evenly instead. ``train=False``: in order, rank ``r`` takes samples ``r, r+N, r+2N, …``;
    every sample exactly once over all ranks.
    """

    def __init__(
        self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, train: bool = True, seed: int = 0
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        if train and n < world_size:
            raise ValueError(f"{n} training samples cannot be shared by {world_size} workers")
        self.n, self.batch_size, self.rank, self.world_size, self.train, self.seed = (
            n,
            batch_size,
            rank,
            world_size,
            train,
            seed,
        )
        self.epoch = 0
        self.weights: torch.Tensor | None = None  # hard mining: draw weights per sample (None: a permutation)

    def set_weights(self, weights: torch.Tensor | None) -> None:
        """Draw the training order with replacement, sample ``i`` with probability ∝ ``weights[i]``
        (the same on every rank: the draw is seeded by (seed, epoch) alone); None: a permutation."""
        if weights is not None and len(weights) != self.n:
            raise ValueError(f"{len(weights)} weights for {self.n} samples")
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _share(self) -> int:
        """Samples per rank per global batch."""
        g = self.batch_size * self.world_size
        return self.batch_size if self.n >= g else self.n // self.world_size

    def __iter__(self) -> Iterator[int]:
        if not self.train:
            return iter(range(self.rank, self.n, self.world_size))
        gen = torch.Generator()
        gen.manual_seed(seed_for(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=gen).tolist()
        share = self._share()
        g = share * self.world_size
        out: list[int] = []
        for start in range(0, self.n - g + 1, g):
            out += order[start + self.rank * share : start + (self.rank + 1) * share]
        return iter(out)

    def __len__(self) -> int:
        if not self.train:
            return len(range(self.rank, self.n, self.world_size))
        share = self._share()
        return (self.n // (share * self.world_size)) * share


def kfold_split(n: int, folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists of fold ``fold`` of ``folds``: one permutation of ``n``
    samples cut into ``folds`` near-equal parts; part ``fold`` validates, the rest train. Over the
    folds the validation parts are disjoint and cover every sample once."""
    if folds < 2:
        raise ValueError(f"cv.folds must be >= 2, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"cv.fold must be in [0, {folds}), got {fold}")
    if n < folds:
        raise ValueError(f"only {n} samples: too few for {folds} folds")
    order = np.random.default_rng(seed).permutation(n).tolist()
    bounds = [round(i * n / folds) for i in range(folds + 1)]
    val = order[bounds[fold] : bounds[fold + 1]]
    return order[: bounds[fold]] + order[bounds[fold + 1] :], val


def batch_scale(scales: list[int], seed: int, epoch: int, step: int) -> int:
    """Multi-scale training: the size of train batch ``step`` of ``epoch`` (a function of these
    alone, so every DDP rank resizes its share of a global batch to the same size)."""
    return int(scales[seed_for(seed, epoch, step, 7) % len(scales)])
