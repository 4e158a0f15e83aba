"""FID, KID and Inception Score from features already computed, on torchmetrics.

torchmetrics computes these statistics in ``compute()`` from what its feature network returned in
``update()``; handing it :class:`~diffusion_lightning.metrics.features.PrecomputedFeatures` (an
identity) as the network lets the same, tested statistics run on cached real features and on
features of any extractor (Inception, the digit judge). The random subsets of KID and the split
shuffle of IS are drawn from a seeded, forked RNG, so equal inputs give equal numbers.

The functions take whole feature sets, so their metrics never synchronize across processes
(``sync_on_compute=False``): under DDP a caller gathers the features first (or, as the periodic
evaluation does, computes on rank 0 alone, where a synchronizing ``compute()`` would wait forever
for the other processes).
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_lightning.metrics.features import PrecomputedFeatures

__all__ = ["FewSamplesWarning", "fid", "inception_score", "kid"]


class FewSamplesWarning(UserWarning):
    """Fewer samples than a stable covariance estimate needs."""


def _check(real: torch.Tensor, fake: torch.Tensor) -> int:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake must be (N, D) features of one D, got {tuple(real.shape)}, {tuple(fake.shape)}."
        )
    return real.shape[1]


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets.

    Each covariance is ``D x D``; from fewer than ``D + 1`` samples it is singular and the distance
    is dominated by estimation noise (a set this small warns and names KID, which is unbiased at
    any size).
    """
    dim = _check(real, fake)
    for name, count in (("generated", fake.shape[0]), ("real", real.shape[0])):
        if count < 2:
            raise ValueError(f"FID needs at least 2 {name} samples, got {count}.")
        if count <= dim:
            warnings.warn(
                f"FID from {count} {name} samples in a {dim}-dimensional feature space: the covariance needs at "
                f"least {dim + 1} samples (several times more to be stable). Use more samples or read KID.",
                FewSamplesWarning,
                stacklevel=2,
            )
    metric = FrechetInceptionDistance(
        feature=PrecomputedFeatures(dim), reset_real_features=False, sync_on_compute=False
    )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over ``subsets`` random subsets); subsets shrink to the smaller set."""
    dim = _check(real, fake)
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 samples in each set, got {real.shape[0]} real, {fake.shape[0]} generated."
        )
    with warnings.catch_warnings():  # "will save all extracted features": that is the point, they are features
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(dim), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from class logits of the generated images."""
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"logits must be (N, K) with N >= splits={splits}, got shape {tuple(logits.shape)}.")
    metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
