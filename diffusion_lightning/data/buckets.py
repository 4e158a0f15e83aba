"""Aspect-ratio bucketing: resolution buckets of about equal area and a batch sampler drawing from one at a time.

Training on square crops throws away the sides of wide and tall images and teaches a model that
subjects are cut off at the edges. Bucketing keeps each image close to its own aspect ratio instead:
:func:`make_buckets` lists ``(height, width)`` sizes of about ``resolution ** 2`` pixels,
:func:`nearest_bucket` gives each image the one whose aspect ratio is closest to its own, and
:class:`BucketBatchSampler` puts only images of one bucket in a batch, so a batch still stacks into
one tensor. Its order depends only on ``(seed, epoch)`` and it resumes to the batch, as
:class:`~diffusion_lightning.data.sampling.EpochSeededSampler` does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from diffusion_lightning.data.sampling import EpochSeededSampler
from diffusion_lightning.utils.seeding import mix_seed

__all__ = ["BatchesOf", "BucketBatchSampler", "check_bucket_options", "make_buckets", "nearest_bucket"]

#: Side multiple a bucket must keep at least: the 8x downsampling of Stable Diffusion's VAE.
MIN_BUCKET_STEP = 8


def check_bucket_options(resolution: int, bucket_step: int, max_aspect: float) -> None:
    """Raise a ``ValueError`` naming the field when the bucket options cannot make buckets."""
    if isinstance(bucket_step, bool) or not isinstance(bucket_step, int) or bucket_step < MIN_BUCKET_STEP:
        raise ValueError(
            f"bucket_step={bucket_step!r} must be an integer >= {MIN_BUCKET_STEP} (bucket sides are multiples of it)."
        )
    if bucket_step % MIN_BUCKET_STEP:
        raise ValueError(
            f"bucket_step={bucket_step!r} must be a multiple of {MIN_BUCKET_STEP} (the VAE of a latent model "
            "downsamples by 8), e.g. 8, 16, 32 or 64."
        )
    if resolution % bucket_step:
        divisors = [s for s in range(MIN_BUCKET_STEP, resolution + 1, MIN_BUCKET_STEP) if resolution % s == 0]
        raise ValueError(
            f"resolution={resolution!r} is not a multiple of bucket_step={bucket_step!r}, so no bucket would be "
            f"square; use a bucket_step that divides it ({divisors or 'none: make resolution a multiple of 8'})."
        )
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, int | float) or not max_aspect >= 1.0:
        raise ValueError(
            f"max_aspect={max_aspect!r} must be a number >= 1: the long side over the short side of the most "
            "elongated bucket (1 keeps only the square bucket, 2.0 allows buckets up to 2:1 and 1:2)."
        )


def make_buckets(resolution: int, bucket_step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """The ``(height, width)`` buckets of about ``resolution ** 2`` pixels, narrowest-tall to widest, square included.

    For each short side ``a`` (a multiple of ``bucket_step`` up to ``resolution``) the long side is the
    largest multiple of ``bucket_step`` keeping the area at most ``resolution ** 2``, so no bucket
    costs more memory than the square one; buckets whose long side over short side exceeds
    ``max_aspect`` are left out, and of two with the same long side the larger is kept. Each bucket
    comes in both orientations. ``resolution`` must be a multiple of ``bucket_step`` (see
    :func:`check_bucket_options`), which makes ``(resolution, resolution)`` one of them.
    """
    check_bucket_options(resolution, bucket_step, max_aspect)
    area = resolution * resolution
    short_of_long: dict[int, int] = {}
    for short in range(bucket_step, resolution + 1, bucket_step):
        long = area // short // bucket_step * bucket_step
        if long <= max_aspect * short:
            short_of_long[long] = short  # short sides ascend: the last one is the largest bucket of that long side
    sizes = {pair for long, short in short_of_long.items() for pair in ((short, long), (long, short))}
    return sorted(sizes, key=lambda size: (size[1] / size[0], size))


def nearest_bucket(buckets: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """Index of the bucket whose aspect ratio is closest to ``width / height`` (on a log scale).

    On a log scale 2:1 and 1:2 are equally far from 1:1; a tie goes to the first bucket of the list.
    An image more elongated than every bucket gets the most elongated one of its orientation.
    """
    if height < 1 or width < 1:
        raise ValueError(f"an image of {height}x{width} pixels has no aspect ratio.")
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


class BucketBatchSampler(EpochSeededSampler):
    """Batches of indices of one bucket each, in an order that depends only on ``(seed, epoch)``, sharded by batch.

    Each epoch, a permutation seeded by ``(seed, epoch)`` is split by bucket (keeping its order)
    and each bucket's part cut into batches of ``batch_size``; the last, incomplete batch of a
    bucket is dropped with ``drop_last`` and served smaller otherwise. The batches of all buckets
    are then shuffled together (seeded by ``(seed, epoch)`` too), so consecutive batches come from
    any bucket instead of one bucket after the other.
    Without ``shuffle`` the batches follow the dataset order, bucket by bucket.

    With ``num_replicas`` processes, process ``rank`` takes every ``num_replicas``-th batch from its
    rank on (the batches are padded with their own start to a multiple of ``num_replicas``); after
    ``b`` steps the processes together consumed exactly the first ``b * num_replicas`` batches.
    A sample count handed to :meth:`skip_in_epoch` (the data module's ``samples_seen``, which counts
    ``batch_size`` per batch and process) skips ``num_samples // batch_size`` batches from the front
    of the epoch, once, so a run resumed from a mid-epoch checkpoint on as many processes sees the
    batches the uninterrupted run would have seen (on another number of processes: every remaining
    batch once). Items are lists of indices: a ``DataLoader`` takes it as ``sampler`` with
    ``batch_size=None`` over a dataset that reads a list of indices at once (:class:`BatchesOf`).
    It is a ``DistributedSampler`` so that Lightning uses it as it is under DDP.

    Args:
        buckets: The bucket (any hashable id, e.g. its index) of each sample of the dataset.
        batch_size: Samples per batch and process.
        drop_last: Drop the incomplete last batch of each bucket.
        seed: Seed of the shuffling.
        shuffle: ``False`` iterates in dataset order (the skip and the sharding still apply).
        num_replicas: Data-parallel processes sharing the epoch (>= 1).
        rank: This process's index among them, in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        buckets: Sequence[Any],
        batch_size: int,
        drop_last: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(len(buckets), seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1.")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.drop_last = drop_last
        counts: dict[Any, int] = {}
        for bucket in self.buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        self.bucket_counts = counts
        round_up = 0 if drop_last else batch_size - 1
        self.num_batches = sum((count + round_up) // batch_size for count in counts.values())

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch, in order (every process's, before sharding and skipping)."""
        order = super().order()  # the (seed, epoch) permutation of the samples
        members: dict[Any, list[int]] = {bucket: [] for bucket in self.bucket_counts}  # buckets in dataset order
        for index in order:
            members[self.buckets[index]].append(index)
        batches = [
            batch
            for indices in members.values()
            for batch in (indices[start : start + self.batch_size] for start in range(0, len(indices), self.batch_size))
            if len(batch) == self.batch_size or not self.drop_last
        ]
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    @override
    def order(self) -> list[int]:
        """The samples of :meth:`batches`, one batch after the other."""
        return [index for batch in self.batches() for index in batch]

    @override
    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        # A generator, so the order is drawn at the first batch: a loader with ``batch_size=None``
        # calls ``iter`` on its sampler when its own iterator is made, which Lightning does before
        # ``set_epoch`` when it resumes mid-epoch (a ``BatchSampler`` around a sampler is lazy already).
        rest = self.batches()[self._skip.pop(self.epoch, 0) // self.batch_size :]
        if self.num_replicas > 1 and rest:
            padded = len(rest) + (-len(rest) % self.num_replicas)
            rest = list(itertools.islice(itertools.cycle(rest), padded))[self.rank :: self.num_replicas]
        yield from rest

    @override
    def __len__(self) -> int:
        # This process's batches of the whole epoch (see EpochSeededSampler.__len__ for why not the rest).
        return -(-self.num_batches // self.num_replicas)


class BatchesOf(Dataset):
    """``dataset`` read a list of items at a time: what a loader with ``batch_size=None`` hands its collate.

    Args:
        dataset: The dataset whose samples make the batches.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, items: Sequence[Any]) -> list[Any]:
        return [self.dataset[item] for item in items]
