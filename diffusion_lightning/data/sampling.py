"""Seeded, resumable sample orders shared by every data module, and the class-balanced split.

:class:`EpochSeededSampler` draws one order per ``(seed, epoch)``, shards it over processes and
can skip what a resumed epoch already served, so a run resumed from a mid-epoch checkpoint sees
the batches it would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler
from typing_extensions import override

from diffusion_lightning.utils.seeding import mix_seed

__all__ = ["EpochSeededSampler", "data_parallel_shard", "stratified_split"]


def data_parallel_shard(trainer: Any) -> tuple[int, int]:
    """``(num_replicas, rank)`` of this process among the trainer's data-parallel processes.

    Lightning's ``trainer.distributed_sampler_kwargs`` (DDP and friends); ``(1, 0)`` without a
    trainer or with a single-device strategy.
    """
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


class EpochSeededSampler(DistributedSampler):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``, sharded over processes.

    Each epoch has one global order, a permutation seeded by ``(seed, epoch)`` (``0..N-1`` without
    shuffling); Lightning calls :meth:`set_epoch` before each epoch. With ``num_replicas``
    data-parallel processes, process ``rank`` takes every ``num_replicas``-th entry of the order
    from its rank on (the order is padded with its own start to a multiple of ``num_replicas``, as
    torch's ``DistributedSampler`` does). The processes together thus consume the order front to
    back: after ``b`` batches of ``B`` samples each, exactly its first ``b * B * num_replicas``
    entries, whatever the number of processes.

    After a mid-epoch resume, :meth:`skip_in_epoch` drops the samples the interrupted run had
    already consumed from the front of the order, once, and the rest is sharded over the processes
    of the resumed run: with as many processes as before it sees exactly the batches the
    uninterrupted run would have seen, with another number of processes every remaining sample of
    the epoch once. torch's ``RandomSampler`` draws from the global generator and cannot be
    replayed from a checkpoint; this is why the sampler is written here. It is a
    ``DistributedSampler`` so that Lightning uses it as it is under DDP instead of wrapping it in a
    sampler that would shuffle and shard it again (``DistributedSampler.__init__`` is not used: it
    wants a dataset).

    Args:
        num_samples: Size of the dataset.
        seed: Seed of the shuffling.
        shuffle: ``False`` iterates in order (the skip and the sharding still apply).
        num_replicas: Data-parallel processes sharing the epoch (>= 1).
        rank: This process's index among them, in ``[0, num_replicas)``.
    """

    def __init__(
        self, num_samples: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas!r} must be >= 1.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must be in [0, num_replicas={num_replicas}).")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = False
        self.epoch = 0
        self._skip: dict[int, int] = {}

    @override
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_in_epoch(self, epoch: int, num_samples: int) -> None:
        """Skip the first ``num_samples`` samples of the global order the next time epoch ``epoch`` is iterated.

        The sampler is set to ``epoch`` as well: when Lightning resumes mid-epoch it makes the
        loader's iterator before it calls :meth:`set_epoch`, and a loader with worker processes
        draws its first indices right then, which would otherwise come from epoch 0's order.
        """
        self._skip[epoch] = num_samples
        self.epoch = epoch

    def order(self) -> list[int]:
        """The global order of the current epoch (every process's samples, before sharding and skipping)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(range(self.num_samples))

    @override
    def __iter__(self) -> Iterator[int]:
        rest = self.order()[self._skip.pop(self.epoch, 0) :]
        if self.num_replicas > 1 and rest:
            padded = len(rest) + (-len(rest) % self.num_replicas)
            rest = list(itertools.islice(itertools.cycle(rest), padded))[self.rank :: self.num_replicas]
        return iter(rest)

    @override
    def __len__(self) -> int:
        # Always this process's share of the whole epoch: Lightning sizes the loader once per fit
        # (before set_epoch) and keeps that length for every epoch; on a mid-epoch resume its loop
        # starts counting at the batches already processed, and the shorter iteration ends the epoch.
        return -(-self.num_samples // self.num_replicas)


def stratified_split(labels: torch.Tensor, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Index sets of the given sizes (the rest last), class-balanced, random within each class.

    Samples are shuffled, then ordered by their rank within their class relative to the class
    size, so every prefix of the order holds the classes in their overall proportions.
    """
    n = labels.shape[0]
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    shuffled = labels[perm]
    key = torch.empty(n, dtype=torch.float64)
    for c in shuffled.unique():
        where = (shuffled == c).nonzero().flatten()
        key[where] = torch.arange(where.numel(), dtype=torch.float64) / where.numel()
    order = perm[torch.argsort(key, stable=True)]
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    parts.append(order[start:])
    return parts
