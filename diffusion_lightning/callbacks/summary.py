"""Describe a run when training starts; write a JSON summary and a summary figure when fitting ends."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import PIL.Image
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from diffusion_lightning.callbacks.run_info import describe_run, log_run_description, summary_figure
from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.utils.io import write_json


class RunSummary(Callback):
    """Record how a ``fit`` went in one small JSON file, also when it is interrupted.

    The file holds ``status`` (``finished``, ``interrupted`` or ``failed``), ``global_step``,
    ``epochs``, ``wall_time_s``, ``steps_per_s``, every scalar in ``trainer.callback_metrics``
    under ``metrics`` (final train and validation losses among them) and the best and last
    checkpoint paths. A run that raised is ``failed`` with the exception under ``error`` (a
    non-finite loss, for one: see :class:`~diffusion_lightning.modules.nonfinite.NonFiniteLossGuard`);
    so is a run that ends with a NaN or infinite value of the checkpoint's monitored metric
    (``val/loss`` without a checkpoint callback). Non-finite metrics are written as ``null`` and
    named with their value under ``nonfinite_metrics``, so the file stays standard JSON; the
    module's ``skipped_nonfinite_steps`` is recorded when it has one. The file also holds the
    run's description (``components``: class and total/trainable parameters of each child
    network; ``noise_scheduler``: its diffusers config; ``cli_config``: the path of the
    ``config.yaml`` LightningCLI saved) and, under ``diffusion``, the per-epoch records of the
    callbacks that keep them (:class:`~diffusion_lightning.callbacks.TimestepLossLogger`'s loss per
    timestep bucket, :class:`~diffusion_lightning.callbacks.GenerationMonitor`'s generation cost and
    latent statistics, :class:`~diffusion_lightning.callbacks.PeriodicEvaluation`'s scores), merged
    by epoch. Written atomically, by rank 0 only, beside the ``checkpoints`` folder of the CLI.

    With ``summary_figure`` and such records, it also draws them in
    ``<default_root_dir>/summary.png`` when fitting ends (loss per timestep bucket per epoch,
    generation time, peak memory, latent statistics) and logs it as the image ``diffusion/summary``.

    With ``log_description`` the description also goes to the loggers when training starts (see
    :func:`~diffusion_lightning.callbacks.run_info.log_run_description`): parameter counts as
    scalars ``config/net/<component>/params_total|params_trainable`` and hyperparameters, the
    scheduler config as hyperparameters ``noise_scheduler/<key>``, and texts ``config/components``,
    ``config/noise_scheduler`` and ``config/cli``.

    Args:
        path: Where to write; default ``<trainer.default_root_dir>/metrics.json``.
        log_description: Log the run's description to the loggers when training starts.
        summary_figure: Draw and log ``summary.png`` when fitting ends.
    """

    def __init__(self, path: str | None = None, log_description: bool = True, summary_figure: bool = True) -> None:
        self.path = path
        self.log_description = log_description
        self.summary_figure = summary_figure
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

    def summary(self, trainer: pl.Trainer, status: str, error: str | None = None) -> dict[str, Any]:
        """The summary as a dictionary (what is written); ``error`` says why a run failed."""
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        steps = trainer.global_step - self._start_step
        metrics = self.scalar_metrics(trainer)
        nonfinite = {name: str(value) for name, value in metrics.items() if not math.isfinite(value)}
        checkpoint = trainer.checkpoint_callback
        best_score = getattr(checkpoint, "best_model_score", None)
        best_score = float(best_score) if best_score is not None else None
        summary = {
            "status": status,
            "global_step": trainer.global_step,
            "steps_this_run": steps,
            "epochs": trainer.current_epoch,
            "wall_time_s": round(elapsed, 2),
            "steps_per_s": round(steps / elapsed, 4) if elapsed > 0 else None,
            "metrics": {name: None if name in nonfinite else value for name, value in metrics.items()},
            "best_model_path": getattr(checkpoint, "best_model_path", None) or None,
            "best_model_score": best_score if best_score is not None and math.isfinite(best_score) else None,
            "last_model_path": getattr(checkpoint, "last_model_path", None) or None,
            "pid": os.getpid(),
            **describe_run(trainer, trainer.lightning_module, log_dir=self._summary_log_dir(trainer)),
        }
        if error is not None:
            summary["error"] = error
        if nonfinite:
            summary["nonfinite_metrics"] = nonfinite
        skipped = getattr(trainer.lightning_module, "skipped_nonfinite_steps", None)
        if isinstance(skipped, int):
            summary["skipped_nonfinite_steps"] = skipped
        edges, epochs = self.history(trainer)
        if epochs:
            summary["diffusion"] = {"timestep_buckets": [list(edge) for edge in edges], "epochs": epochs}
        return summary

    @staticmethod
    def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
        """Every scalar of ``trainer.callback_metrics`` as a float (NaN and infinities included)."""
        return {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        }

    @staticmethod
    def nonfinite_monitor(trainer: pl.Trainer) -> str | None:
        """Why a run that ended normally failed: its monitored metric is NaN or infinite (``None``: it did not)."""
        name = getattr(trainer.checkpoint_callback, "monitor", None) or "val/loss"
        value = RunSummary.scalar_metrics(trainer).get(name)
        if value is None or math.isfinite(value):
            return None
        return f"the monitored metric {name} is {value} at the end of fitting (global step {trainer.global_step})"

    @staticmethod
    def history(trainer: pl.Trainer) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
        """The timestep buckets and the per-epoch records of every callback that keeps them, merged by epoch."""
        edges: list[tuple[int, int]] = []
        merged: dict[int, dict[str, Any]] = {}
        for callback in trainer.callbacks:
            records = getattr(callback, "epoch_records", None)
            if not callable(records):
                continue
            for record in records():
                into = merged.setdefault(record["epoch"], {"epoch": record["epoch"], "step": record["step"]})
                into.update({k: v for k, v in record.items() if k != "step"})
                into["step"] = max(into["step"], record["step"])
            edges = edges or list(getattr(callback, "bucket_edges", None) or [])
            for part in getattr(callback, "parts", []):  # a group of callbacks (the deprecated DiffusionMetricsLogger)
                edges = edges or list(getattr(part, "bucket_edges", None) or [])
        return edges, [merged[epoch] for epoch in sorted(merged)]

    def _summary_log_dir(self, trainer: pl.Trainer) -> str:
        """Where LightningCLI saved ``config.yaml``, without a collective ("" when unknown)."""
        if self._log_dir is None and trainer.world_size == 1:
            return trainer.log_dir or ""  # outside fit with one process: no other process to wait for
        return self._log_dir or ""

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        write_json(self._target(trainer), self.summary(trainer, status, error))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        diverged = self.nonfinite_monitor(trainer)
        if trainer.interrupted:
            self._write(trainer, "interrupted")
        else:
            self._write(trainer, "failed" if diverged else "finished", diverged)
        if self.summary_figure and trainer.is_global_zero:
            self._draw(trainer)

    def _draw(self, trainer: pl.Trainer) -> None:
        edges, epochs = self.history(trainer)
        if not epochs:
            return
        path = Path(trainer.default_root_dir) / "summary.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary_figure(epochs, edges).savefig(path, dpi=100)
        with PIL.Image.open(path) as image:
            log_image(trainer, "diffusion/summary", image.convert("RGB"))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self._write(trainer, "interrupted")
        else:
            self._write(trainer, "failed", f"{type(exception).__name__}: {exception}")
