"""Within-group diversity: the mean LPIPS distance between pairs of samples of the same class (or prompt).

The groups are integer labels: classes of a class-conditioned model, or the index of each sample's
prompt for a text-to-image model.

LPIPS (Zhang et al., 2018) compares deep features of an ImageNet backbone (AlexNet, VGG16 or
SqueezeNet) weighted by linear layers fitted to human judgements. The linear layers ship inside
the ``lpips`` package; the backbone's ImageNet weights are read from a local torchvision state
dict (never downloaded here). A random backbone is allowed only on request, with a warning, since
its numbers are not comparable to published LPIPS.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lpips
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from diffusion_lightning.metrics.features import check_image_range

__all__ = ["BACKBONE_WEIGHTS", "LPIPSDiversity", "LPIPSWeightsMissing", "backbone_weights_url"]

log = logging.getLogger(__name__)

#: torchvision's ImageNet weights for each LPIPS backbone.
BACKBONE_WEIGHTS: dict[str, Any] = {
    "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


class LPIPSWeightsMissing(FileNotFoundError):
    """The backbone's ImageNet weights are neither given nor in the torch hub cache."""


def backbone_weights_url(net: str) -> str:
    """The URL torchvision downloads the ImageNet weights of LPIPS backbone ``net`` from."""
    return BACKBONE_WEIGHTS[net].url


def _hub_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_weights_url(net).rsplit("/", 1)[-1]


class LPIPSDiversity(nn.Module):
    """LPIPS distances between images in ``[0, 1]`` and the within-class diversity built on them.

    Args:
        net: The backbone: ``"alex"`` (the LPIPS default), ``"vgg"`` or ``"squeeze"``.
        backbone_weights: A torchvision state dict of that backbone (e.g. ``alexnet-owt-7be5be79.pth``);
            ``None`` looks for torchvision's file in the torch hub cache.
        allow_random_backbone: When no weights are found, keep the backbone random (with a warning)
            instead of raising.
        min_size: Images smaller than this (height or width) are upsampled to at least it, bilinearly:
            AlexNet's pooling needs more than MNIST's 28 pixels.
        batch_size: Pairs per forward pass in :meth:`diversity`.

    Raises:
        ValueError: ``net`` is unknown or the weights file does not fit the backbone.
        FileNotFoundError: ``backbone_weights`` does not exist.
        LPIPSWeightsMissing: No weights found and ``allow_random_backbone`` is false.
    """

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: str | Path | None = None,
        allow_random_backbone: bool = False,
        min_size: int = 64,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if net not in BACKBONE_WEIGHTS:
            raise ValueError(f"net={net!r} is not an LPIPS backbone; choose one of {sorted(BACKBONE_WEIGHTS)}.")
        if min_size < 1:
            raise ValueError(f"min_size must be positive, got {min_size}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.net = net
        self.min_size = min_size
        self.batch_size = batch_size
        with warnings.catch_warnings():  # lpips builds torchvision nets with the deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self.lpips.eval().requires_grad_(False)
        self.weights_path = self._find_weights(backbone_weights, allow_random_backbone)
        self.random_backbone = self.weights_path is None
        if self.weights_path is not None:
            self._load_backbone(self.weights_path)
        else:
            warnings.warn(
                f"LPIPS runs with a RANDOM {net} backbone (no ImageNet weights at {_hub_path(net)}): its distances "
                "are not comparable to published LPIPS numbers, only to each other.",
                UserWarning,
                stacklevel=2,
            )

    def _find_weights(self, path: str | Path | None, allow_random: bool) -> Path | None:
        if path is not None:
            explicit = Path(path).expanduser()
            if not explicit.is_file():
                raise FileNotFoundError(
                    f"backbone_weights={str(path)!r} does not exist (or is not a file); expected a torchvision "
                    f"{self.net} state dict like {backbone_weights_url(self.net)}."
                )
            return explicit
        cached = _hub_path(self.net)
        if cached.is_file():
            return cached
        if allow_random:
            return None
        raise LPIPSWeightsMissing(
            f"The ImageNet weights of the LPIPS {self.net} backbone were not found at {cached}. On a machine with a "
            f"network, download {backbone_weights_url(self.net)} and copy it there, or pass its path with "
            "backbone_weights=PATH. allow_random_backbone=True runs with a random backbone instead (numbers not "
            "comparable to published LPIPS)."
        )

    def _load_backbone(self, path: Path) -> None:
        """Copy torchvision's ``features.<i>`` weights into the lpips slices that hold module ``<i>``."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"backbone_weights={str(path)!r} could not be read as a state dict: {err}") from err
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"backbone_weights={str(path)!r} holds a {type(state).__name__}, not a state dict.")
        mapped: dict[str, torch.Tensor] = {}
        for key in self.lpips.net.state_dict():
            slice_name, index, rest = key.split(".", 2)  # e.g. slice2.3.weight <- features.3.weight
            source = f"features.{index}.{rest}"
            if source not in state:
                raise ValueError(
                    f"backbone_weights={str(path)!r} lacks {source!r}: it is not a torchvision {self.net} state dict "
                    f"(like {backbone_weights_url(self.net)})."
                )
            mapped[key] = state[source]
        try:
            self.lpips.net.load_state_dict(mapped, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"backbone_weights={str(path)!r} does not fit the torchvision {self.net} backbone: {err}"
            ) from err

    def train(self, mode: bool = True) -> LPIPSDiversity:
        return super().train(False)  # dropout in the linear layers stays off

    def _prepare(self, images: torch.Tensor, field: str) -> torch.Tensor:
        c, h, w = images.shape[1:]
        if c == 1:
            images = images.expand(-1, 3, -1, -1)
        elif c != 3:
            raise ValueError(f"{field} must have 1 or 3 channels, got {c}.")
        if min(h, w) < self.min_size:
            scale = self.min_size / min(h, w)
            size = (max(self.min_size, round(h * scale)), max(self.min_size, round(w * scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        device = next(self.lpips.parameters()).device
        return images.to(device=device, dtype=torch.float32).clamp(0, 1)

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of each pair ``(a[i], b[i])``, images in ``[0, 1]`` of the same shape.

        Returns:
            ``(B,)`` float32 distances on the CPU.
        """
        check_image_range(a, "a")
        check_image_range(b, "b")
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
        return self._distance(a, b)

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.lpips(self._prepare(a.float(), "a"), self._prepare(b.float(), "b"), normalize=True)
        return out.reshape(a.shape[0]).float().cpu()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(a, b)

    @torch.no_grad()
    def diversity(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        max_pairs_per_class: int = 50,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Mean LPIPS between random pairs of distinct samples of the same class.

        Per class, all unordered pairs are used when there are at most ``max_pairs_per_class`` of
        them, else that many distinct pairs drawn at random. Classes with fewer than two samples
        are skipped.

        Args:
            images: ``(B, C, H, W)`` floats in ``[0, 1]``.
            labels: ``B`` integer class labels.
            max_pairs_per_class: At most this many pairs per class.
            generator: Random source for the pairs; ``None`` uses a fresh generator seeded with 0,
                so the same inputs always give the same pairs.

        Returns:
            ``{"per_class": {label: mean distance}, "mean": mean of the per-class means,
            "pairs": number of pairs scored}``.

        Raises:
            ValueError: Bad images or labels, or no class with two samples.
        """
        check_image_range(images)
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if labels.numel() != images.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries but images has {images.shape[0]}.")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
        if max_pairs_per_class < 1:
            raise ValueError(f"max_pairs_per_class must be positive, got {max_pairs_per_class}.")
        if generator is None:
            generator = torch.Generator().manual_seed(0)

        pairs: list[torch.Tensor] = []
        owners: list[int] = []
        for label in torch.unique(labels).tolist():
            members = torch.nonzero(labels == label).flatten()
            if members.numel() < 2:
                continue
            chosen = members[_sample_pairs(members.numel(), max_pairs_per_class, generator)]
            pairs.append(chosen)
            owners.append(int(label))
        if not pairs:
            counts = dict(zip(*(t.tolist() for t in torch.unique(labels, return_counts=True))))
            raise ValueError(f"diversity needs a class with at least 2 samples; got samples per class {counts}.")

        index = torch.cat(pairs)
        distances = torch.cat(
            [
                self._distance(images[index[i : i + self.batch_size, 0]], images[index[i : i + self.batch_size, 1]])
                for i in range(0, len(index), self.batch_size)
            ]
        )
        per_class = {
            label: chunk.mean().item()
            for label, chunk in zip(owners, distances.split([len(p) for p in pairs]), strict=True)
        }
        return {"per_class": per_class, "mean": sum(per_class.values()) / len(per_class), "pairs": len(index)}


def _sample_pairs(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``k`` distinct unordered pairs ``(i, j)``, ``i < j < n``, as a ``(m, 2)`` tensor; all when few."""
    total = n * (n - 1) // 2
    if total <= 4 * k:  # few pairs: list them all, take a random subset
        every = torch.combinations(torch.arange(n), r=2)
        return every if total <= k else every[torch.randperm(total, generator=generator)[:k]]
    chosen: dict[tuple[int, int], None] = {}  # many pairs: rejection sampling, accepts most draws
    while len(chosen) < k:
        draw = torch.randint(n, (2 * k, 2), generator=generator)
        for i, j in draw.tolist():
            if i != j:
                chosen.setdefault((min(i, j), max(i, j)), None)
                if len(chosen) == k:
                    break
    return torch.tensor(list(chosen), dtype=torch.long)
