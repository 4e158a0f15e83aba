"""Checkpoints written like every other file of the package: beside their target, then renamed into place."""

from __future__ import annotations

from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from diffusion_lightning.utils.io import atomic_file

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose saves a kill can neither truncate nor leave behind.

    Lightning serializes a checkpoint in memory, writes it to a temporary file in the system's
    temporary folder and moves that into place. When the checkpoint folder is on another file
    system than ``/tmp`` (a tmpfs ``/tmp``, checkpoints on a mounted disk) the move is a copy, and a
    run killed during it leaves a truncated ``last.ckpt`` where the previous one was; a run killed
    before the move leaves a checkpoint-sized file in ``/tmp`` that nothing removes.

    Here a local checkpoint is serialized into a hidden temporary file beside its target
    (``.NAME.PID-*.tmp``), flushed to disk and renamed over the target in one step
    (:func:`~diffusion_lightning.utils.io.atomic_file`): the target holds the previous checkpoint
    or the new one at every moment, and the temporary of a killed writer is removed by the next
    save of the same checkpoint. Remote paths (``s3://`` and other fsspec file systems) keep
    Lightning's save.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"storage_options={storage_options!r}: {type(self).__name__} saves local files and takes no "
                "storage options; expected None."
            )
        with atomic_file(local_path, "wb") as handle:
            torch.save(checkpoint, handle)
