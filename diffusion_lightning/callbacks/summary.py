"""Describe a run when training starts; write a JSON summary (steps, wall time, metrics) when fitting ends."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from diffusion_lightning.callbacks.metrics import DiffusionMetricsLogger
from diffusion_lightning.callbacks.run_info import describe_run, log_run_description
from diffusion_lightning.utils.io import write_json


class RunSummary(Callback):
    """Record how a ``fit`` went in one small JSON file, also when it is interrupted.

    The file holds ``status`` (``finished``, ``interrupted`` or ``failed``), ``global_step``,
    ``epochs``, ``wall_time_s``, ``steps_per_s``, every scalar in ``trainer.callback_metrics``
    under ``metrics`` (final train and validation losses among them) and the best and last
    checkpoint paths, the run's description (``components``: class and total/trainable parameters
    of each child network; ``noise_scheduler``: its diffusers config; ``cli_config``: the path of
    the ``config.yaml`` LightningCLI saved) and, when a
    :class:`~diffusion_lightning.callbacks.DiffusionMetricsLogger` is attached, its per-epoch
    history under ``diffusion``. Written atomically, by rank 0 only, beside the ``checkpoints``
    folder of the CLI.

    With ``log_description`` the description also goes to the loggers when training starts (see
    :func:`~diffusion_lightning.callbacks.run_info.log_run_description`): parameter counts as
    scalars ``config/net/<component>/params_total|params_trainable`` and hyperparameters, the
    scheduler config as hyperparameters ``noise_scheduler/<key>``, and texts ``config/components``,
    ``config/noise_scheduler`` and ``config/cli``.

    Args:
        path: Where to write; default ``<trainer.default_root_dir>/metrics.json``.
        log_description: Log the run's description to the loggers when training starts.
    """

    def __init__(self, path: str | None = None, log_description: bool = True) -> None:
        self.path = path
        self.log_description = log_description
        self._start: float | None = None
        self._start_step = 0
        self._log_dir: str | None = None  # trainer.log_dir, read by every process when fitting starts

    def _target(self, trainer: pl.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / "metrics.json"

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        # A broadcast under a distributed strategy: read here, where every process is, not in the rank-0 write.
        self._log_dir = trainer.log_dir or ""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step
        if self.log_description:
            log_run_description(trainer, pl_module)

    def summary(self, trainer: pl.Trainer, status: str) -> dict[str, Any]:
        """The summary as a dictionary (what is written)."""
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        steps = trainer.global_step - self._start_step
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        }
        checkpoint = trainer.checkpoint_callback
        summary = {
            "status": status,
            "global_step": trainer.global_step,
            "steps_this_run": steps,
            "epochs": trainer.current_epoch,
            "wall_time_s": round(elapsed, 2),
            "steps_per_s": round(steps / elapsed, 4) if elapsed > 0 else None,
            "metrics": metrics,
            "best_model_path": getattr(checkpoint, "best_model_path", None) or None,
            "best_model_score": (
                float(checkpoint.best_model_score)
                if getattr(checkpoint, "best_model_score", None) is not None
                else None
            ),
            "last_model_path": getattr(checkpoint, "last_model_path", None) or None,
            "pid": os.getpid(),
            **describe_run(trainer, trainer.lightning_module, log_dir=self._summary_log_dir(trainer)),
        }
        diffusion = next((cb for cb in trainer.callbacks if isinstance(cb, DiffusionMetricsLogger)), None)
        if diffusion is not None:
            summary["diffusion"] = diffusion.summary()
        return summary

    def _summary_log_dir(self, trainer: pl.Trainer) -> str:
        """Where LightningCLI saved ``config.yaml``, without a collective ("" when unknown)."""
        if self._log_dir is None and trainer.world_size == 1:
            return trainer.log_dir or ""  # outside fit with one process: no other process to wait for
        return self._log_dir or ""

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, status: str) -> None:
        write_json(self._target(trainer), self.summary(trainer, status))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "interrupted" if trainer.interrupted else "finished")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer, "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")
