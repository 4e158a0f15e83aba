"""A folder of real images as the reference set of FID, KID and precision/recall.

:class:`FolderReference` serves a folder the way a data module serves a split (``setup()``, then
``datasets[split]`` of ``{"images" in [-1, 1], "captions", "keys"}`` samples), so
:func:`~diffusion_lightning.metrics.reference.real_reference` computes and caches its features
like any data set's. Two layouts are read:

- a captions folder, what ``ImageCaptionDataModule(source="folder", root=...)`` reads (an imagefolder
  ``metadata.jsonl``, at the top or in ``train/`` and ``validation/``, or ``train/captions.json``):
  its listed images, all of them in ``train`` (no validation share is held out), and the
  ``validation/`` ones in ``val`` when it has that folder;
- any other folder: every image file in it and its subfolders, in ``train``.

Images are resized (short side) and centre-cropped to ``resolution``, by default the short side of
the first image. The folder's fingerprint (file names, sizes and modification times) is part of
its cache key, so editing the folder recomputes its features.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "FolderReference"]

#: File suffixes read as images in a plain folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Files whose presence makes a folder a captions folder (the layouts ``ImageCaptionDataModule`` reads).
CAPTION_FILES: tuple[str, ...] = ("metadata.jsonl", "train/metadata.jsonl", "train/captions.json")


def _fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _short_side(path: Path) -> int:
    with Image.open(path) as image:
        return min(image.size)


class FolderReference:
    """Real images of a folder, served as ``datasets["train"]`` (and ``"val"``) after :meth:`setup`.

    Args:
        root: The folder: a captions folder or a plain folder of images (see the module's documentation).
        resolution: Side of the square images; ``None``: the short side of the first image.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or a plain folder holds no image.
        ValueError: ``resolution`` is not ``None`` or an int ``>= 1``.
    """

    def __init__(self, root: str | os.PathLike[str], resolution: int | None = None) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"reference={str(root)!r} is not a folder; expected a folder of images or a captions folder "
                "(metadata.jsonl with file_name and text)."
            )
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution={resolution!r} is not accepted; expected an int >= 1 or None.")
        self.root = str(path.resolve())
        self.layout = "captions" if any((path / name).is_file() for name in CAPTION_FILES) else "images"
        self.fingerprint = _fingerprint(path)
        self.resolution = resolution
        self.image_size = resolution
        self.datasets: dict[str, Any] = {}
        if self.layout == "images" and not self._image_files():
            raise FileNotFoundError(
                f"reference={str(root)!r} holds no image (files ending in {', '.join(IMAGE_SUFFIXES)}) and no "
                f"caption file ({', '.join(CAPTION_FILES)})."
            )

    def _image_files(self) -> list[Path]:
        root = Path(self.root)
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def setup(self, stage: str | None = None) -> None:
        """List the images (once); fixes :attr:`resolution` when it was ``None``."""
        if self.datasets:
            return
        from diffusion_lightning.data.captions import ImageCaptionDataModule, ImageCaptions

        root = Path(self.root)
        parts: dict[str, dict[str, Any]]
        if self.layout == "captions":
            data = ImageCaptionDataModule(source="folder", root=self.root, resolution=1, val_fraction=0.0)
            data.setup("fit")
            parts = {
                split: {"paths": list(d.paths or []), "captions": list(d.captions), "keys": list(d.keys)}
                for split, d in data.datasets.items()
                if len(d)
            }
        else:
            paths = self._image_files()
            keys = [p.relative_to(root).as_posix() for p in paths]
            parts = {"train": {"paths": paths, "captions": [""] * len(paths), "keys": keys}}
        if self.resolution is None:
            self.resolution = _short_side(parts["train"]["paths"][0])
        self.image_size = self.resolution
        self.datasets = {split: ImageCaptions(resolution=self.resolution, **part) for split, part in parts.items()}

    def __repr__(self) -> str:
        return f"FolderReference(root={self.root!r}, layout={self.layout!r}, resolution={self.resolution!r})"
