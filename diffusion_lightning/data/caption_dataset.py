"""The image-caption dataset and its collate: seeded crops and flips, unreadable images skipped.

Samples are ``{"images", "captions", "keys"[, "input_ids"]}``; batches the same, stacked, with
unreadable images dropped by :class:`CaptionCollate` (and refilled from the epoch's order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from diffusion_lightning.data.sampling import EpochSeededSampler
from diffusion_lightning.utils.seeding import mix_seed

__all__ = ["CaptionCollate", "ImageCaptions"]

#: What PIL raises on a file that is not an image, is truncated or is corrupt.
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class _Bad(NamedTuple):  # what the dataset returns for an unreadable image; the collate drops it
    index: int
    epoch: int
    key: str


@dataclass(eq=False)
class ImageCaptions(Dataset):
    """Image-caption pairs served as ``{"images", "captions", "keys"[, "input_ids"]}`` samples.

    Items are indices or ``(index, epoch)`` pairs (what the training sampler yields): the random crop
    and flip of a sample come from a generator seeded with ``(seed, epoch, index)``, so a resumed
    epoch repeats exactly. Images are resized (short side, bilinear) to ``resolution``, cropped square.
    An unreadable file gives a marker the collate drops (``skip_bad_images``) or a ``ValueError``.
    Exactly one of ``paths`` (image files) and ``images`` (``uint8`` ``(N, 1 or 3, H, W)``) is given.
    """

    captions: list[str]
    keys: list[str]
    resolution: int
    paths: list[Path] | None = None
    images: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    random_crop: bool = False
    random_flip: bool = False
    seed: int = 0
    skip_bad_images: bool = True

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | _Bad:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        try:
            image = self._read(index)
        except _BAD_IMAGE_ERRORS as err:
            if not self.skip_bad_images:
                raise ValueError(
                    f"image {str(self.paths[index])!r} could not be read ({type(err).__name__}: {err}); fix or "
                    "remove it, or set skip_bad_images=true to skip unreadable images."
                ) from err
            return _Bad(index, epoch, self.keys[index])
        sample = {"images": self._transform(image, index, epoch), "captions": self.captions[index]}
        sample["keys"] = self.keys[index]
        if self.input_ids is not None:
            sample["input_ids"] = self.input_ids[index]
        return sample

    def without_unreadable(self) -> tuple[ImageCaptions, list[str]]:
        """This set without the image files that cannot be read (each is read once), and their keys."""
        if self.paths is None:
            return self, []
        good, bad = [], []
        for index in range(len(self)):
            try:
                self._read(index)
                good.append(index)
            except _BAD_IMAGE_ERRORS:
                bad.append(self.keys[index])
        if not bad:
            return self, []
        pick = {name: [getattr(self, name)[i] for i in good] for name in ("captions", "keys", "paths")}
        if self.input_ids is not None:
            pick["input_ids"] = self.input_ids[good]
        return dataclasses.replace(self, **pick), bad

    def _read(self, index: int) -> torch.Tensor:
        if self.images is not None:
            image = self.images[index]
            return image.expand(3, -1, -1) if image.shape[0] == 1 else image
        with Image.open(self.paths[index]) as file:
            return TF.pil_to_tensor(ImageOps.exif_transpose(file).convert("RGB"))

    def _transform(self, image: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        size = self.resolution
        image = TF.resize(image, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        height, width = image.shape[-2:]
        top, left, flip = (height - size) // 2, (width - size) // 2, False
        if self.random_crop or self.random_flip:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
            draws = torch.rand(3, generator=generator).tolist()
            if self.random_crop:
                top, left = int(draws[0] * (height - size + 1)), int(draws[1] * (width - size + 1))
            flip = self.random_flip and draws[2] < 0.5
        image = image[:, top : top + size, left : left + size]
        if flip:
            image = image.flip(-1)
        return image.float().div_(127.5).sub_(1.0)


class CaptionCollate:
    """Stack samples into a batch, dropping unreadable images; ``batch["skipped"]`` lists their keys.

    A batch whose every image was unreadable is refilled with the next readable sample in dataset
    order, so no batch is ever empty (a ``RuntimeError`` when no image of the set is readable).

    Args:
        dataset: The dataset the samples come from (read for the refill).
    """

    def __init__(self, dataset: ImageCaptions) -> None:
        self.dataset = dataset

    def __call__(self, samples: list[dict[str, Any] | _Bad]) -> dict[str, Any]:
        good = [s for s in samples if not isinstance(s, _Bad)]
        skipped = [s.key for s in samples if isinstance(s, _Bad)]
        if not good:
            last, n, tried = samples[-1], len(self.dataset), {s.index for s in samples}
            for index in ((last.index + offset) % n for offset in range(1, n)):
                if index in tried:  # already in this batch
                    continue
                sample = self.dataset[index, last.epoch]
                if not isinstance(sample, _Bad):
                    good = [sample]
                    break
                skipped.append(sample.key)
            else:
                keys = list(dict.fromkeys(skipped))
                raise RuntimeError(f"none of the {n} images of the dataset could be read, e.g. {keys[:5]}.")
        batch = {
            "images": torch.stack([s["images"] for s in good]),
            "captions": [s["captions"] for s in good],
            "keys": [s["keys"] for s in good],
            "skipped": list(dict.fromkeys(skipped)),
        }
        if "input_ids" in good[0]:
            batch["input_ids"] = torch.stack([s["input_ids"] for s in good])
        return batch


class _EpochTaggedSampler(EpochSeededSampler):
    """:class:`EpochSeededSampler` yielding ``(index, epoch)``; calls ``on_epoch_start`` first."""

    def __init__(
        self, num_samples: int, seed: int, on_epoch_start: Callable[[], Any], num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        self.on_epoch_start = on_epoch_start

    @override
    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        self.on_epoch_start()
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())
