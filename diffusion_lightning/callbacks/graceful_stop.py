"""Save a resumable checkpoint when a run is asked to stop with SIGTERM."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override


class CheckpointOnSigterm(Callback):
    """On SIGTERM, write ``last.ckpt`` so that ``fit --ckpt_path last`` resumes where the run stopped.

    Lightning turns a SIGTERM into a ``SIGTERMException`` raised at the next batch boundary and
    calls the callbacks' ``on_exception``; this callback then saves the trainer's state with
    ``trainer.save_checkpoint`` (the trainer's checkpoint IO, atomic in the CLI) into the folder of
    the run's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (the CLI's
    ``<default_root_dir>/checkpoints``), or into ``dirpath`` when given. Other exceptions are left alone.

    Args:
        dirpath: Folder of the checkpoint; default: the first ``ModelCheckpoint``'s, else
            ``<default_root_dir>/checkpoints``.
        filename: Name of the checkpoint file, without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = ModelCheckpoint.CHECKPOINT_NAME_LAST) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.saved: str | None = None

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where the checkpoint goes."""
        dirpath = self.dirpath
        if dirpath is None:
            found = trainer.checkpoint_callback
            dirpath = getattr(found, "dirpath", None) if isinstance(found, ModelCheckpoint) else None
        if dirpath is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, self.filename + ModelCheckpoint.FILE_EXTENSION)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            print(f"stopped at step {trainer.global_step}: saved {path}", flush=True)
