"""The image-caption dataset and its collate: seeded crops and flips, unreadable images skipped.

Samples are ``{"images", "captions", "keys", "original_size", "crop_top_left"[, "input_ids"]}``;
batches the same, stacked, with unreadable images dropped by :class:`CaptionCollate` (and refilled
from the epoch's order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from diffusion_lightning.data.buckets import BucketBatchSampler
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
    """Image-caption pairs served as ``{"images", "captions", "keys", "original_size", "crop_top_left"}`` samples.

    Items are indices or ``(index, epoch)`` pairs (what the training sampler yields): the random crop
    and flip of a sample come from a generator seeded with ``(seed, epoch, index)``, so a resumed
    epoch repeats exactly. Images are resized (short side, bilinear) to ``resolution``, cropped square;
    with ``target_sizes`` (aspect-ratio buckets), image ``i`` is resized (bilinear) to the smallest
    size covering ``target_sizes[i]`` (``(height, width)``) with its aspect ratio kept, and cropped to it.
    An unreadable file gives a marker the collate drops (``skip_bad_images``) or a ``ValueError``.
    Exactly one of ``paths`` (image files) and ``images`` (``uint8`` ``(N, 1 or 3, H, W)``) is given.

    With a tokenizer's ``input_ids``, a sample also carries its row of them as ``input_ids``.

    Every sample records what SDXL's size and crop conditioning needs: ``original_size``, the
    ``(height, width)`` of the image as read (upright, after its EXIF orientation; before any
    resize), and ``crop_top_left``, the ``(top, left)`` of the crop in the resized image. After a
    horizontal flip the crop is given in the flipped resized image (as if flipped before cropping),
    since that is the image the model sees. The target size is the image tensor's own.
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
    target_sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | _Bad:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        try:
            image = self._read(index)
        except _BAD_IMAGE_ERRORS as err:
            if not self.skip_bad_images:
                raise self._unreadable(index, err) from err
            return _Bad(index, epoch, self.keys[index])
        original_size = (int(image.shape[-2]), int(image.shape[-1]))
        pixels, crop_top_left = self._transform(image, index, epoch)
        sample = {"images": pixels, "captions": self.captions[index], "keys": self.keys[index]}
        sample["original_size"], sample["crop_top_left"] = original_size, crop_top_left
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
        names = ("captions", "keys", "paths") + (("target_sizes",) if self.target_sizes is not None else ())
        pick = {name: [getattr(self, name)[i] for i in good] for name in names}
        if self.input_ids is not None:
            pick["input_ids"] = self.input_ids[good]
        return dataclasses.replace(self, **pick), bad

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """The ``(height, width)`` of every image as :meth:`__getitem__` reads it; ``None`` for an unreadable file.

        Only the files' headers are read, which is what makes bucketing a large folder affordable.
        An unreadable file raises the ``ValueError`` of :meth:`__getitem__` without ``skip_bad_images``.
        """
        if self.images is not None:
            return [(int(self.images.shape[-2]), int(self.images.shape[-1]))] * len(self)
        sizes: list[tuple[int, int] | None] = []
        for index, path in enumerate(self.paths):
            try:
                sizes.append(_upright_size(path))
            except _BAD_IMAGE_ERRORS as err:
                if not self.skip_bad_images:
                    raise self._unreadable(index, err) from err
                sizes.append(None)
        return sizes

    def _unreadable(self, index: int, err: Exception) -> ValueError:
        return ValueError(
            f"image {str(self.paths[index])!r} could not be read ({type(err).__name__}: {err}); fix or "
            "remove it, or set skip_bad_images=true to skip unreadable images."
        )

    def _read(self, index: int) -> torch.Tensor:
        if self.images is not None:
            image = self.images[index]
            return image.expand(3, -1, -1) if image.shape[0] == 1 else image
        with Image.open(self.paths[index]) as file:
            return TF.pil_to_tensor(ImageOps.exif_transpose(file).convert("RGB"))

    def _transform(self, image: torch.Tensor, index: int, epoch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image resized, cropped (and flipped) in ``[-1, 1]``, and the ``(top, left)`` of its crop."""
        if self.target_sizes is None:
            crop_height = crop_width = self.resolution
            image = TF.resize(image, [self.resolution], interpolation=InterpolationMode.BILINEAR, antialias=True)
        else:
            crop_height, crop_width = self.target_sizes[index]
            covering = cover_size(image.shape[-2], image.shape[-1], crop_height, crop_width)
            image = TF.resize(image, list(covering), interpolation=InterpolationMode.BILINEAR, antialias=True)
        height, width = image.shape[-2:]
        top, left, flip = (height - crop_height) // 2, (width - crop_width) // 2, False
        if self.random_crop or self.random_flip:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
            draws = torch.rand(3, generator=generator).tolist()
            if self.random_crop:
                top, left = int(draws[0] * (height - crop_height + 1)), int(draws[1] * (width - crop_width + 1))
            flip = self.random_flip and draws[2] < 0.5
        image = image[:, top : top + crop_height, left : left + crop_width]
        if flip:
            image = image.flip(-1)
            left = width - crop_width - left
        return image.float().div_(127.5).sub_(1.0), (int(top), int(left))


def cover_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The smallest ``(height, width)`` of the image's aspect ratio covering ``(target_height, target_width)``.

    The side that limits the scale gets the target exactly and the other is rounded down, computed
    in integers so that it never falls a pixel short of its target.
    """
    if target_height * width >= target_width * height:
        return target_height, target_height * width // height
    return target_width * height // width, target_width


def _upright_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file once its EXIF orientation is applied, from its header."""
    with Image.open(path) as file:
        width, height = file.size
        # Image.getexif, not the file's own: PNG's reads the whole image when its header holds no EXIF.
        orientation = Image.Image.getexif(file).get(ExifTags.Base.Orientation, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class CaptionCollate:
    """Stack samples into a batch, dropping unreadable images; ``batch["skipped"]`` lists their keys.

    ``original_size`` and ``crop_top_left`` are stacked into ``LongTensor`` s of shape ``(B, 2)``.

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
            "original_size": torch.tensor([s["original_size"] for s in good], dtype=torch.long),
            "crop_top_left": torch.tensor([s["crop_top_left"] for s in good], dtype=torch.long),
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


class _EpochTaggedBucketSampler(BucketBatchSampler):
    """:class:`BucketBatchSampler` yielding batches of ``(index, epoch)``; calls ``on_epoch_start`` first."""

    def __init__(
        self,
        buckets: list[Any],
        batch_size: int,
        drop_last: bool,
        seed: int,
        on_epoch_start: Callable[[], Any],
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(buckets, batch_size, drop_last=drop_last, seed=seed, num_replicas=num_replicas, rank=rank)
        self.on_epoch_start = on_epoch_start

    @override
    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        # A generator: nothing happens before the first batch (see BucketBatchSampler.__iter__).
        self.on_epoch_start()
        epoch = self.epoch
        for batch in super().__iter__():
            yield [(index, epoch) for index in batch]
