"""An infinite, resumable, rank-aware batch order.

Epoch e is a permutation drawn from ``seed + e``; each global batch of ``batch_size * world`` indices
is split between ranks. Starting at global batch ``start_batch`` reproduces exactly the order an
uninterrupted run would have seen from there, which is what ``--resume`` needs. The sampler yields
``(index, seed + e)``: datasets draw their augmentation from that pair, never from a worker's RNG, so
the items are the same with or without loader workers and after a resume.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from core.errors import UserError


class StepSampler(Sampler[tuple[int, int]]):
    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        if num_items < batch_size * world:
            raise UserError(f"the dataset has {num_items} items, fewer than one global batch "
                             f"({batch_size} x {world} processes); lower the batch size")
        self.n, self.bs, self.seed, self.start = num_items, batch_size, seed, start_batch
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.batches_per_epoch = num_items // (batch_size * world)  # the remainder is dropped

    def _epoch(self, e: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.start
        while True:
            e, i = divmod(b, self.batches_per_epoch)
            perm = self._epoch(e)
            glob = self.bs * self.world
            while i < self.batches_per_epoch:
                start = i * glob + self.rank * self.bs
                yield from ((j, self.seed + e) for j in perm[start : start + self.bs].tolist())
                i += 1
            b = (e + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # infinite; DataLoader only needs this for progress estimates
        return 2**62


def step_loader(dataset, batch_size: int, seed: int, start_batch: int, rank: int = 0, world: int = 1,
                num_workers: int = 0, worker_init_fn=None) -> DataLoader:
    """DataLoader over a StepSampler. It has its own generator, so creating its iterator draws nothing
    from the global RNG: a resumed run's RNG stream matches an uninterrupted one."""
    sampler = StepSampler(len(dataset), batch_size, seed=seed, start_batch=start_batch, rank=rank, world=world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init_fn,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed + start_batch))
