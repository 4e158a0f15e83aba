"""The standard FID/IS feature space: torch-fidelity's InceptionV3 (the TensorFlow 2015 weights).

The weights are never downloaded here and never replaced by random ones: a random Inception gives
numbers that look like FIDs and mean nothing. They come from an explicit file or from the torch hub
cache, where ``torch.hub.load_state_dict_from_url`` (and so torch-fidelity and torchmetrics) would
have put them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import NoTrainInceptionV3

from diffusion_lightning.metrics.features import FeatureExtractor, check_image_range
from diffusion_lightning.utils.compat import inception_features_and_logits

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "InceptionFeatures",
    "InceptionWeightsMissing",
    "file_fingerprint",
    "resolve_inception_weights",
]

log = logging.getLogger(__name__)

#: File name of torch-fidelity's InceptionV3 weights (converted from TensorFlow's 2015-12-05 graph).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: Where torch-fidelity downloads them from.
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3


class InceptionWeightsMissing(FileNotFoundError):
    """The InceptionV3 weights are neither given nor in the torch hub cache."""


def hub_checkpoint(file_name: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``file_name``: ``<hub dir>/checkpoints/<file_name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """Find the InceptionV3 weights file: ``path`` when given, else the torch hub cache.

    Args:
        path: An explicit weights file; it must exist.

    Returns:
        The path of the weights file.

    Raises:
        FileNotFoundError: ``path`` was given and does not exist.
        InceptionWeightsMissing: No ``path`` and the file is not in the torch hub cache.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise FileNotFoundError(
                f"inception_weights={str(path)!r} does not exist (or is not a file); expected torch-fidelity's "
                f"InceptionV3 weights {INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL})."
            )
        return explicit
    cached = hub_checkpoint(INCEPTION_WEIGHTS_FILE)
    if cached.is_file():
        return cached
    raise InceptionWeightsMissing(
        f"The InceptionV3 weights for FID/IS ({INCEPTION_WEIGHTS_FILE}) were not found at {cached}. "
        f"On a machine with a network, download {INCEPTION_WEIGHTS_URL} and copy it to {cached}, or pass its path "
        f"with inception_weights=PATH (--inception-weights PATH on the command line). For digits, the domain "
        f'feature extractor needs no download: feature_extractor="digits" (--feature-extractor digits).'
    )


def file_fingerprint(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class InceptionFeatures(FeatureExtractor):
    """InceptionV3 pool features ``(B, 2048)`` (FID, KID, precision/recall) and unbiased logits ``(B, 1008)`` (IS).

    The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the TensorFlow
    graph, always in eval mode). Images are quantised to ``uint8`` at their own resolution and
    resized to 299x299 inside the network (bilinear, antialiased), the order torchmetrics'
    ``FrechetInceptionDistance`` uses, so features match it for the same uint8 images.

    Args:
        weights: The weights file; ``None`` looks in the torch hub cache
            (see :func:`resolve_inception_weights`).

    Raises:
        InceptionWeightsMissing: No ``weights`` and none in the torch hub cache.
        FileNotFoundError: ``weights`` does not exist.
        ValueError: The file does not hold InceptionV3 weights.
    """

    num_features = 2048
    image_size = 299
    in_channels = 3
    has_logits = True

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        self.weights_path = resolve_inception_weights(weights)
        self.name = f"inception-v3-2048-{file_fingerprint(self.weights_path)}"
        try:
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(self.weights_path),
            )
        except (RuntimeError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(
                f"inception_weights={str(self.weights_path)!r} is not a torch-fidelity InceptionV3 state dict "
                f"({INCEPTION_WEIGHTS_FILE}): {err}"
            ) from err

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check the range and bring 1-channel images to 3; the size is left to the network."""
        check_image_range(images)
        c, h, w = images.shape[1:]
        if c not in (1, 3):
            raise ValueError(f"{self.name} takes 1- or 3-channel images, got {c} channels.")
        if (c, h, w) != (self.in_channels, self.image_size, self.image_size) and (c, h, w) not in self._noted:
            self._noted.add((c, h, w))
            log.info(
                "%s: converting images of %d channel(s) at %dx%d to 3 channels at 299x299 for the extractor.",
                self.name, c, h, w,
            )  # fmt: skip
        return images.expand(-1, 3, -1, -1).clamp(0, 1)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pool features and unbiased logits of prepared images in ``[0, 1]``."""
        pixels = (images * 255).round().to(torch.uint8)
        features, logits = inception_features_and_logits(self.network, pixels)
        return {"features": features.float(), "logits": logits.float()}
