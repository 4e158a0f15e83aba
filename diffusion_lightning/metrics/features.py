"""Feature extractors: the networks whose feature space FID, KID, precision/recall and realism use.

Every extractor takes images as the pipelines return them, ``(B, C, H, W)`` floats in ``[0, 1]``,
and brings them to what its network wants (channel count, size) itself, noting the conversion
once. Values outside ``[0, 1]`` are an error rather than a silent clamp: they usually mean images
in ``[-1, 1]`` were passed, and scoring those would give a wrong number, not a failing one.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitFeatures", "FeatureExtractor", "PrecomputedFeatures", "check_image_range"]

log = logging.getLogger(__name__)

#: Slack for float rounding when checking that images lie in ``[0, 1]``.
RANGE_TOLERANCE = 1e-3


def check_image_range(images: torch.Tensor, field: str = "images") -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``(B, C, H, W)`` tensor with values in ``[0, 1]``."""
    if images.ndim != 4:
        raise ValueError(f"{field} must be (B, C, H, W), got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise ValueError(f"{field} must be floats in [0, 1], got dtype {images.dtype}.")
    lo, hi = images.min().item(), images.max().item()
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = " (images in [-1, 1]? map them with images / 2 + 0.5)" if lo < 0 else ""
        raise ValueError(f"{field} must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]{hint}.")


class FeatureExtractor(nn.Module, ABC):
    """Images in ``[0, 1]`` to features ``(B, num_features)`` and, when the network classifies, logits.

    Subclasses set :attr:`name` (part of the key of cached real-image statistics, so two networks
    never share a cache entry), :attr:`num_features`, :attr:`image_size` and :attr:`in_channels`,
    and implement :meth:`extract` on prepared images. ``forward`` returns the features alone, so
    an extractor can be handed to torchmetrics as its ``feature`` network.
    """

    name: str
    num_features: int
    image_size: int
    in_channels: int
    has_logits: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._noted: set[tuple[int, int, int]] = set()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check the range; convert the channel count and resize to the network's input, noting it once."""
        check_image_range(images)
        c, h, w = images.shape[1:]
        if (c, h, w) != (self.in_channels, self.image_size, self.image_size) and (c, h, w) not in self._noted:
            self._noted.add((c, h, w))
            log.info(
                "%s: converting images of %d channel(s) at %dx%d to %d channel(s) at %dx%d for the extractor.",
                self.name, c, h, w, self.in_channels, self.image_size, self.image_size,
            )  # fmt: skip
        if c != self.in_channels:
            if c == 1:
                images = images.expand(-1, self.in_channels, -1, -1)
            elif self.in_channels == 1 and c == 3:
                weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
                images = (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise ValueError(f"{self.name} takes {self.in_channels}-channel images; cannot convert {c} channels.")
        if (h, w) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0, 1)

    @abstractmethod
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"features": (B, D)}`` plus ``"logits"`` when :attr:`has_logits`, from prepared images."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features (and logits) of images in ``[0, 1]``, in float32 on the CPU."""
        param = next(self.parameters(), None)
        device = param.device if param is not None else images.device
        out = self.extract(self.prepare(images.to(device).float()))
        return {key: value.float().cpu() for key, value in out.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.prepare(images.float()))["features"]


class PrecomputedFeatures(nn.Module):
    """A pass-through ``feature`` network for torchmetrics: ``update`` takes features, not images.

    torchmetrics' FID/KID/IS run their network inside ``update``; feeding already-computed (and
    cached) features through this identity lets them do the statistics without recomputing.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def state_fingerprint(module: nn.Module, length: int = 12) -> str:
    """A short hash of a module's weights: names a feature space in cache keys."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:length]


class DigitFeatures(FeatureExtractor):
    """The digit judge's penultimate features (a domain FID on digits) and its class logits.

    Args:
        classifier: A trained :class:`~diffusion_lightning.DigitClassifier` (put in eval mode).
    """

    has_logits = True

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        for param in self.classifier.parameters():
            param.requires_grad_(False)
        hparams = classifier.hparams
        self.image_size = int(hparams.get("image_size", 28))
        self.in_channels = int(hparams.get("in_channels", 1))
        self.num_features = int(hparams.get("feature_dim", 128))
        self.name = f"digits-{state_fingerprint(classifier)}"

    def train(self, mode: bool = True) -> DigitFeatures:
        return super().train(False)  # batch norm stays in inference mode

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.classifier.features(images * 2 - 1)
        return {"features": features, "logits": self.classifier.head(features)}
