"""CIFAR-10: 32x32 colour images in 10 classes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from diffusion_lightning.data.base import LabelledImageDataModule

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_FOLDER = "cifar-10-batches-py"


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch of the python version: ``uint8`` ``(N, 3, 32, 32)`` images and labels."""
    with path.open("rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = entry.get("labels", entry.get("fine_labels"))
    return torch.from_numpy(data.copy()), torch.as_tensor(labels, dtype=torch.long)


class CIFAR10DataModule(LabelledImageDataModule):
    """CIFAR-10 from the python batches in ``root/cifar-10-batches-py``.

    ``download: true`` fetches them with ``torchvision.datasets.CIFAR10``; the batches are then
    read directly (every ``data_batch_*`` file present is used), so a folder with fewer batches
    works too. Validation is a class-balanced ``val_fraction`` of the training batches; the test
    set is ``test_batch``.

    Args:
        root: Folder that holds (or will hold) ``cifar-10-batches-py``.
        download: Download the dataset into ``root`` when it is missing.
        **kwargs: Loader and split options of :class:`LabelledImageDataModule`.
    """

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download
        self.num_classes = 10
        self.in_channels = 3
        self.image_size = 32
        self.class_names = list(CIFAR10_CLASSES)

    @property
    def folder(self) -> Path:
        return Path(self.root) / _FOLDER

    def prepare_data(self) -> None:
        if self.download and not self.folder.is_dir():
            from torchvision.datasets import CIFAR10

            try:
                CIFAR10(self.root, train=True, download=True)
            except OSError as err:
                raise FileNotFoundError(
                    f"could not download CIFAR-10 into {str(self.folder)!r} ({err}); copy the python "
                    "batches there by hand."
                ) from err

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        self.prepare_data()
        train_files = sorted(self.folder.glob("data_batch_*"))
        test_file = self.folder / "test_batch"
        if not train_files or not test_file.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 python batches (data_batch_*, test_batch) not found in {str(self.folder)!r}. "
                "Set data.init_args.download=true on a machine with network, or unpack "
                "cifar-10-python.tar.gz into data.init_args.root."
            )
        batches = [read_cifar_batch(p) for p in train_files]
        train = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        return {"train": train, "test": read_cifar_batch(test_file)}
