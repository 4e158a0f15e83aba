"""Precision, recall and realism of generated samples against real ones (Kynkäänniemi et al., 2019).

"Improved Precision and Recall Metric for Assessing Generative Models" estimates each set's
manifold in feature space as the union of balls around its samples, each ball reaching the
sample's k-th nearest neighbour in the same set:

- precision: the fraction of generated samples inside the real manifold (fidelity);
- recall: the fraction of real samples inside the generated manifold (coverage, diversity);
- realism of one generated sample ``g``: ``max_r radius(r) / ||g - r||`` over real samples ``r``
  whose radius is below the median (the paper drops the largest half of the balls, which cover
  outliers); ``>= 1`` means inside the pruned real manifold, larger means closer to typical real
  samples. It stands in for a rater's "was this written by a human?" score, per sample.

torchmetrics has no implementation of these (its image metrics are FID, KID, IS, LPIPS, MiFID
and the like), so they are written here on ``torch.cdist``, in chunks so that memory stays at
``chunk x N`` distances whatever the set sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ManifoldScores", "kth_neighbour_radii", "manifold_scores"]

#: Rows of a distance matrix computed at once.
CHUNK = 1024


def _check_features(name: str, features: torch.Tensor, k: int) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(features.shape)}.")
    if features.shape[0] <= k:
        raise ValueError(f"{name} has {features.shape[0]} samples; the k={k} nearest-neighbour balls need more than k.")
    return features.double()


def kth_neighbour_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each row of ``features`` to its ``k``-th nearest other row, ``(N,)``."""
    features = _check_features("features", features, k)
    radii = []
    for start in range(0, features.shape[0], CHUNK):
        distances = torch.cdist(features[start : start + CHUNK], features)
        # The smallest distance of each row is the row itself (0): the k-th neighbour is at index k.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each query lies in at least one ball ``(centre, radius)``, ``(Q,)`` bool."""
    inside = []
    for start in range(0, queries.shape[0], CHUNK):
        distances = torch.cdist(queries[start : start + CHUNK], centres)
        inside.append((distances <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def _realism(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    keep = radii <= radii.median()
    centres, radii = centres[keep], radii[keep]
    scores = []
    for start in range(0, queries.shape[0], CHUNK):
        distances = torch.cdist(queries[start : start + CHUNK], centres).clamp_min(1e-12)
        scores.append((radii.unsqueeze(0) / distances).max(dim=1).values)
    return torch.cat(scores)


@dataclass
class ManifoldScores:
    """Set-level precision and recall plus per-generated-sample membership and realism."""

    precision: float
    recall: float
    in_real_manifold: torch.Tensor  # (M,) bool, per generated sample
    realism: torch.Tensor  # (M,) float, per generated sample
    k: int


def manifold_scores(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, real_radii: torch.Tensor | None = None
) -> ManifoldScores:
    """Precision, recall and realism of ``fake`` features ``(M, D)`` against ``real`` ``(N, D)``.

    Args:
        real: Features of real samples.
        fake: Features of generated samples, in the same feature space.
        k: The neighbour that sets each ball's radius (the paper uses 3).
        real_radii: The real set's radii when already known (they depend only on ``real`` and ``k``).
    """
    if k < 1:
        raise ValueError(f"k={k!r} must be >= 1.")
    real = _check_features("real", real, k)
    fake = _check_features("fake", fake, k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dimensions, fake features {fake.shape[1]}.")
    radii_real = kth_neighbour_radii(real, k) if real_radii is None else real_radii.double()
    radii_fake = kth_neighbour_radii(fake, k)
    in_real = _inside(fake, real, radii_real)
    covered = _inside(real, fake, radii_fake)
    return ManifoldScores(
        precision=in_real.double().mean().item(),
        recall=covered.double().mean().item(),
        in_real_manifold=in_real,
        realism=_realism(fake, real, radii_real).float(),
        k=k,
    )
