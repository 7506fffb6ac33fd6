"""Training data whose order and random crops are functions of (seed, epoch, position) only, so an interrupted run
resumed from a checkpoint sees exactly the batches an uninterrupted one would.

Lightning restores the model, optimizer, scheduler and loop counters, but a plain shuffled ``DataLoader`` restarts
its epoch from a fresh permutation, and random crops drawn from the global RNG depend on everything that drew from
it before (validation, the solver, prefetching). Here the permutation of epoch ``e`` is seeded by (seed, e)
(torch's ``DistributedSampler``, which also shards it under DDP), a resumed epoch skips the batches already
trained on, and every training item is made under its own seed (seed, e, index)."""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


def derived_seed(*keys: int) -> int:
    """One 63-bit seed from integer keys (run seed, epoch, index, ...): distinct keys give unrelated streams."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True)`` (one process: ``num_replicas=1``) yielding ``(index, item_seed)``, where
    the item seed is ``derived_seed(seed, epoch, index)`` for :class:`SeededItems`. :meth:`resume_at` makes the
    first pass over ``epoch`` skip its first ``n_items`` items (the batches trained on before the checkpoint).
    ``len()`` stays the full epoch's: Lightning counts the skipped batches as done from its restored progress."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, n_items: int) -> None:
        self.set_epoch(epoch)  # an iterator made before Lightning's set_epoch (num_workers > 0) starts right too
        self._resume = (epoch, n_items)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # a generator: the permutation is drawn at the first next(), after Lightning's set_epoch
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        for i in list(super().__iter__())[skip:]:
            yield i, derived_seed(self.seed, self.epoch, i)


class SeededItems(Dataset):
    """``dataset[index]`` drawn under the seed the sampler gives with it (``(index, seed)`` keys), with the global
    CPU RNG saved and restored around it: an item's random crop, flip or phantom is the same whichever process,
    worker or moment makes it, and making it leaves the global stream untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
