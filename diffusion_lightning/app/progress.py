"""A callback that keeps a small JSON file with a fit's progress, which the app's Train tab reads."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from diffusion_lightning.utils.io import write_json

#: The file :class:`ProgressFile` writes in the run's ``default_root_dir``.
PROGRESS_FILE = "progress.json"


class ProgressFile(Callback):
    """Write ``<default_root_dir>/progress.json`` as training goes: step, total, loss, ETA.

    The file holds ``status`` (``running``, ``finished``, ``stopped`` or ``failed``), ``start_step`` (the
    global step training started from: above 0 when it resumed a checkpoint), ``step``, ``max_steps``
    (the trainer's estimate of the steps to run), ``epoch``, ``loss`` (the last logged ``train/loss``,
    or any logged scalar whose name ends in ``loss``), ``elapsed_s``, ``eta_s`` and ``pid``. It is
    written atomically, at most every ``every_s`` seconds, and when training starts and ends.

    Args:
        path: Where to write; default ``<default_root_dir>/progress.json``.
        every_s: Least seconds between two writes during training.
    """

    def __init__(self, path: str | None = None, every_s: float = 0.5) -> None:
        self.path = path
        self.every_s = every_s
        self._start = 0.0
        self._start_step = 0
        self._last = 0.0

    def _write(self, trainer: pl.Trainer, status: str) -> None:
        if not trainer.is_global_zero:
            return
        elapsed = time.monotonic() - self._start
        step = trainer.global_step
        total = trainer.estimated_stepping_batches if trainer.state.fn == "fit" else None
        total = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
        done = step - self._start_step
        eta = (total - step) * elapsed / done if total is not None and done > 0 else None
        write_json(
            self.path or os.path.join(trainer.default_root_dir, PROGRESS_FILE),
            {
                "status": status,
                "start_step": self._start_step,
                "step": step,
                "max_steps": total,
                "epoch": trainer.current_epoch,
                "loss": _loss(trainer.callback_metrics),
                "elapsed_s": round(elapsed, 2),
                "eta_s": None if eta is None else round(max(eta, 0.0), 1),
                "pid": os.getpid(),
            },
        )
        self._last = time.monotonic()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step
        self._write(trainer, "running")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._write(trainer, "running")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "finished")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._write(trainer, "stopped" if isinstance(exception, SIGTERMException) else "failed")


def _loss(metrics: dict[str, Any]) -> float | None:
    """The training loss among the logged metrics (``train/loss`` first), as a float."""
    names = [name for name in ("train/loss", "train/loss_step", "train_loss") if name in metrics]
    names += sorted(name for name in metrics if name.endswith("loss") and name not in names)
    for name in names:
        try:
            value = float(metrics[name])
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            return round(value, 6)
    return None
