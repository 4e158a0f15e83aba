"""What every data module shares: loaders, resumable seeded shuffling, the labelled-image base.

:class:`DiffusionDataModule` owns the loaders, the training sampler and the resume state of every
data module; :class:`LabelledImageDataModule` adds class-labelled images, their class-balanced
split and the predict set of class labels, so a concrete labelled data module says only how to
read its source (:meth:`LabelledImageDataModule.load`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from diffusion_lightning.data.sampling import EpochSeededSampler, data_parallel_shard, stratified_split
from diffusion_lightning.utils.compat import batches_processed_in_epoch


class LabelledImages(Dataset):
    """``uint8`` images with integer labels, served as ``{"images", "labels"}`` in ``[-1, 1]``.

    Args:
        images: ``(N, C, H, W)`` ``uint8`` tensor.
        labels: ``(N,)`` integer tensor.
        pad_to: Pad each image with background (``-1``) to this square size, centred.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pad_to: int | None = None) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a (N, C, H, W) uint8 tensor, got {images.dtype} {tuple(images.shape)}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({images.shape[0]},).")
        height, width = images.shape[-2:]
        if pad_to is not None and pad_to < max(height, width):
            raise ValueError(f"pad_to={pad_to!r} is smaller than the images ({height}x{width}).")
        self.images = images
        self.labels = labels.long()
        self.pad_to = pad_to
        self._pad = (0, 0, 0, 0)
        if pad_to is not None:
            top, left = (pad_to - height) // 2, (pad_to - width) // 2
            self._pad = (left, pad_to - width - left, top, pad_to - height - top)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index].float().div_(127.5).sub_(1.0)
        if self.pad_to is not None:
            image = torch.nn.functional.pad(image, self._pad, value=-1.0)
        return {"images": image, "labels": self.labels[index]}


def _check_fraction(field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{field}={value!r} must be in [0, 1).")


def _check_at_least_one(**fields: int | None) -> None:
    for field, value in fields.items():
        if value is not None and value < 1:
            raise ValueError(f"{field}={value!r} must be >= 1.")


class _Columns(Dataset):
    """Sample ``i`` is ``{name: column[i]}`` over equally long columns (tensors or lists)."""

    def __init__(self, columns: dict[str, Sequence[Any] | torch.Tensor]) -> None:
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the columns have different lengths: {lengths}.")
        self.columns = columns
        self.length = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: column[index] for name, column in self.columns.items()}


class ResumableLoader(DataLoader):
    """The training loader of a :class:`DiffusionDataModule`: its state is the data module's place in the epoch.

    Lightning keeps the ``state_dict`` of a training loader that has one in every checkpoint and,
    when it resumes from a checkpoint written mid-epoch, hands it to the ``load_state_dict`` of the
    new run's loader; a loader without them is what it warns about as "not resumable". This one's
    state is :meth:`DiffusionDataModule.state_dict` (the epoch and how much of it was consumed), and
    loading it makes the loader's :class:`EpochSeededSampler` skip what was consumed, as the data
    module does with the same state from its own checkpoint entry (both apply the same skip once).

    Args:
        *args: What ``DataLoader`` takes.
        datamodule: The data module whose place in the epoch is the state.
        **kwargs: What ``DataLoader`` takes.
    """

    def __init__(self, *args: Any, datamodule: DiffusionDataModule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        """The data module's :meth:`~DiffusionDataModule.state_dict`."""
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Skip, in the sampler, what the run that wrote ``state_dict`` had consumed of its epoch."""
        self.datamodule.load_state_dict(state_dict)
        if isinstance(self.sampler, EpochSeededSampler):
            self.datamodule.apply_resume(self.sampler)


class DiffusionDataModule(LightningDataModule):
    """Loaders, seeded shuffling and mid-epoch resume, shared by every data module of the package.

    A subclass says what its samples are: :meth:`build_datasets` reads the source into one dataset per
    split (``train``, ``val`` and, where the source has one, ``test``) and :meth:`predict_columns` lists
    the conditions ``predict_dataloader`` serves; :meth:`collate`, :meth:`train_sampler` and
    :meth:`eval_dataset` adapt how batches are put together.

    The training order depends only on ``(seed, epoch)`` and is sharded over the data-parallel
    processes (:class:`EpochSeededSampler`). ``state_dict`` records how much of the current epoch
    all processes together consumed, and a run resumed from it skips exactly that, so it sees the
    batches the uninterrupted run would have seen. The training loader (a :class:`ResumableLoader`)
    carries the same state, which is how Lightning knows it resumes mid-epoch.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Validation, test and predict batch size (default: ``batch_size``).
        val_fraction: Fraction of the training set held out for validation.
        seed: Seed of the split and of the shuffling.
        num_workers: DataLoader worker processes (0 loads in the training process).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        drop_last: Drop the last incomplete training batch (keeps shapes static for ``compile``).
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        _check_at_least_one(batch_size=batch_size, eval_batch_size=eval_batch_size)
        _check_fraction("val_fraction", val_fraction)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be >= 0.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.datasets: dict[str, Dataset] = {}
        self._sampler: EpochSeededSampler | None = None
        self._resume: dict[str, int] | None = None  # loaded, not yet handed to a sampler
        self._resumed_from: dict[str, int] | None = None  # handed to the sampler: the base of ``state_dict``

    def build_datasets(self) -> dict[str, Dataset]:
        """Read the source: one dataset per split, ``{"train": ..., "val": ...[, "test": ...]}``."""
        raise NotImplementedError

    def predict_columns(self) -> dict[str, Sequence[Any] | torch.Tensor]:
        """The conditions ``predict_dataloader`` serves, as equally long columns (``labels``, ``prompts``)."""
        raise NotImplementedError

    def collate(self, dataset: Dataset) -> Callable[[list[Any]], Any] | None:
        """The ``collate_fn`` of the loaders of ``dataset`` (``None``: torch's default)."""
        return None

    def train_sampler(self, num_samples: int, num_replicas: int, rank: int) -> EpochSeededSampler:
        """The sampler of the training loader: ``(seed, epoch)``-shuffled and sharded over the processes."""
        return EpochSeededSampler(num_samples, seed=self.seed, num_replicas=num_replicas, rank=rank)

    def eval_dataset(self, split: str) -> Dataset:
        """The dataset the ``split`` loader (``val`` or ``test``) serves."""
        if split not in self.datasets:
            raise ValueError(f"{type(self).__name__} has no {split!r} split; it has {sorted(self.datasets)}.")
        return self.datasets[split]

    @override
    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build_datasets()

    def _loader(
        self, dataset: Dataset, batch_size: int, loader: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        return loader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.collate(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        num_replicas, rank = data_parallel_shard(self.trainer)
        self._sampler = self.train_sampler(len(self.datasets["train"]), num_replicas, rank)
        self.apply_resume(self._sampler)
        return self._loader(
            self.datasets["train"],
            self.batch_size,
            ResumableLoader,
            datamodule=self,
            sampler=self._sampler,
            drop_last=self.drop_last,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.eval_dataset("val"), self.eval_batch_size)

    @override
    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.eval_dataset("test"), self.eval_batch_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The :meth:`predict_columns` in order, ``eval_batch_size`` at a time, with ``index``.

        ``index`` (a ``LongTensor``) is each sample's position in the whole predict set, to derive its seed from.
        """
        columns = dict(self.predict_columns())
        columns["index"] = torch.arange(len(next(iter(columns.values()))))
        return DataLoader(_Columns(columns), batch_size=self.eval_batch_size)

    def apply_resume(self, sampler: EpochSeededSampler) -> None:
        """Make ``sampler`` skip what the run being resumed had consumed of its last epoch.

        What ``load_state_dict`` read is handed over once and kept as the base from which
        ``state_dict`` counts the samples of that epoch.
        """
        if self._resume is not None:
            sampler.skip_in_epoch(self._resume["epoch"], self._resume["samples_seen"])
            self._resumed_from, self._resume = self._resume, None

    @override
    def state_dict(self) -> dict[str, Any]:
        """Epoch, samples of it consumed by all processes together, and batches of it per process.

        ``samples_seen`` counts the global order of :class:`EpochSeededSampler` (``batch_size`` per
        batch and process), so a resume on another number of processes skips exactly what was consumed.
        """
        trainer = self.trainer
        if trainer is None:
            return {"epoch": 0, "samples_seen": 0, "batches": 0}
        # Checkpoints are written from on_train_batch_end, after the batch was processed but
        # before Lightning counts it completed: ``processed`` is the number of batches consumed.
        batches = batches_processed_in_epoch(trainer)
        epoch = trainer.current_epoch
        per_batch = self.batch_size * data_parallel_shard(trainer)[0]
        base = self._resumed_from
        if base is not None and base["epoch"] == epoch:  # resumed in this epoch, maybe on another number of processes
            seen = base["samples_seen"] + (batches - base["batches"]) * per_batch
        else:
            seen = batches * per_batch
        return {"epoch": epoch, "samples_seen": seen, "batches": batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seen = int(state_dict["samples_seen"])
        # Checkpoints written before ``batches`` was stored come from one process.
        batches = int(state_dict.get("batches", seen // self.batch_size))
        self._resume = {"epoch": int(state_dict["epoch"]), "samples_seen": seen, "batches": batches}


class LabelledImageDataModule(DiffusionDataModule):
    """Base of the class-labelled image data modules.

    Subclasses implement :meth:`load` and set ``num_classes``, ``in_channels``, ``image_size`` and
    ``class_names`` in ``__init__`` (the CLI links them to the model before any data is read).
    Batches are ``{"images", "labels"}``; ``predict_dataloader`` serves ``{"labels", "index"}``, each
    class ``predict_samples_per_class`` times in a row.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Validation, test and predict batch size (default: ``batch_size``).
        val_fraction: Fraction of the training set held out for validation (class-balanced).
        seed: Seed of the split and of the shuffling.
        num_workers: DataLoader worker processes (0 loads in the training process).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        drop_last: Drop the last incomplete training batch (keeps shapes static for ``compile``).
        predict_samples_per_class: Labels per class served by ``predict_dataloader``.
    """

    num_classes: int
    in_channels: int
    image_size: int
    class_names: list[str]

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        predict_samples_per_class: int = 8,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, seed, num_workers, pin_memory, drop_last)
        _check_at_least_one(predict_samples_per_class=predict_samples_per_class)
        self.predict_samples_per_class = predict_samples_per_class
        self.datasets: dict[str, LabelledImages] = {}

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Read the source: ``{"train": (images, labels), "test": ...}``, ``uint8`` ``(N, C, H, W)``.

        A source without an official test split returns ``train`` only; ``split`` carves the rest.
        """
        raise NotImplementedError

    def split(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Hold out ``val_fraction`` of the training set for validation, class-balanced."""
        images, labels = data["train"]
        n_val = round(self.val_fraction * labels.shape[0])
        val, train = stratified_split(labels, (n_val,), self.seed)
        return {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": data["test"]}

    def pad_to(self) -> int | None:
        return None

    @override
    def build_datasets(self) -> dict[str, LabelledImages]:
        parts = self.split(self.load())
        return {name: LabelledImages(images, labels, pad_to=self.pad_to()) for name, (images, labels) in parts.items()}

    @override
    def predict_columns(self) -> dict[str, torch.Tensor]:
        return {"labels": torch.arange(self.num_classes).repeat_interleave(self.predict_samples_per_class)}
