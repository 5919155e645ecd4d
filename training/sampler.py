"""An infinite, resumable, rank-aware batch order.

Epoch e is a permutation drawn from ``seed + e``; each global batch of ``batch_size * world`` indices
is split between ranks. Starting at global batch ``start_batch`` reproduces exactly the order an
uninterrupted run would have seen from there, which is what ``--resume`` needs.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepSampler(Sampler[int]):
    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        if num_items < batch_size * world:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch "
                             f"({batch_size} x {world} processes); lower the batch size")
        self.n, self.bs, self.seed, self.start = num_items, batch_size, seed, start_batch
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.batches_per_epoch = num_items // (batch_size * world)  # the remainder is dropped

    def _epoch(self, e: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))

    def __iter__(self) -> Iterator[int]:
        b = self.start
        while True:
            e, i = divmod(b, self.batches_per_epoch)
            perm = self._epoch(e)
            glob = self.bs * self.world
            while i < self.batches_per_epoch:
                start = i * glob + self.rank * self.bs
                yield from perm[start : start + self.bs].tolist()
                i += 1
            b = (e + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # infinite; DataLoader only needs this for progress estimates
        return 2**62
