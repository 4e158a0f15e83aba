"""The mean per-sample loss in each timestep bucket, as a torchmetrics ``Metric``.

torchmetrics has no grouped mean, hence this small metric: two states (sums and counts per bucket)
whose ``dist_reduce_fx="sum"`` makes the metric's own sync give the mean over every process.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["TimestepLoss", "bucket_edges", "bucket_names"]


def bucket_edges(num_buckets: int, num_train_timesteps: int) -> list[tuple[int, int]]:
    """Inclusive ``(lo, hi)`` timesteps of ``num_buckets`` equal ranges of ``[0, T)``; each timestep in one."""
    if not 1 <= num_buckets <= num_train_timesteps:
        raise ValueError(f"num_buckets={num_buckets!r} must be in 1..num_train_timesteps={num_train_timesteps}.")
    starts = [-(-b * num_train_timesteps // num_buckets) for b in range(num_buckets + 1)]  # ceil(b * T / n)
    return [(starts[b], starts[b + 1] - 1) for b in range(num_buckets)]


def bucket_names(num_buckets: int, num_train_timesteps: int) -> list[str]:
    """``t<lo>-<hi>`` per bucket, zero-padded to the widest timestep (``t000-099`` for ``T=1000``)."""
    width = len(str(num_train_timesteps - 1))
    return [f"t{lo:0{width}d}-{hi:0{width}d}" for lo, hi in bucket_edges(num_buckets, num_train_timesteps)]


class TimestepLoss(Metric):
    """Mean per-sample loss per timestep bucket; ``compute()`` gives ``(num_buckets,)`` with NaN for empty buckets.

    Timestep ``t`` of ``[0, T)`` falls in bucket ``t * num_buckets // T``. ``update`` is two
    ``index_add_`` on the losses' device, without a host sync.

    Args:
        num_buckets: Number of equal timestep ranges.
        num_train_timesteps: ``T``, the length of the forward process.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    totals: torch.Tensor
    counts: torch.Tensor

    def __init__(self, num_buckets: int, num_train_timesteps: int) -> None:
        super().__init__()
        self.edges = bucket_edges(num_buckets, num_train_timesteps)
        self.names = bucket_names(num_buckets, num_train_timesteps)
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        self.add_state("totals", torch.zeros(num_buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_buckets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Add per-sample ``losses`` of samples noised at ``timesteps`` (both ``(B,)``)."""
        index = (timesteps.long().to(self.totals.device) * self.num_buckets // self.num_train_timesteps).clamp_(
            0, self.num_buckets - 1
        )
        self.totals.index_add_(0, index, losses.detach().to(self.totals))
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))

    def compute(self) -> torch.Tensor:
        """Bucket means, NaN where a bucket saw no sample."""
        return torch.where(self.counts > 0, self.totals / self.counts.clamp_min(1), torch.nan)

    def overall(self) -> torch.Tensor:
        """The mean over every sample (NaN without any); synced like :meth:`compute` when called from it."""
        count = self.counts.sum()
        return self.totals.sum() / count if count > 0 else torch.tensor(float("nan"), dtype=self.totals.dtype)
