"""Evaluation during training: the ``evaluate`` command's scoring, every N epochs, on a bounded budget.

Used by :class:`~diffusion_lightning.callbacks.DiffusionMetricsLogger` (``evaluate_every_n_epochs``
and ``evaluation``). Rank 0 generates and scores (with EMA, the averaged weights, like every
sampling callback placed after it); the scalars are broadcast and logged on every rank with
``LightningModule.log``, so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor
``evals/accuracy`` or ``evals/fid`` under any strategy. Files go to
``<default_root_dir>/eval/epoch=<e>/`` and the grids and per-class table to the loggers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from diffusion_lightning.callbacks.samples import sampling_defaults, sampling_mode
from diffusion_lightning.metrics.evaluator import EvaluationConfig, Evaluator

__all__ = ["PeriodicEvaluation", "bounded_config"]


#: What an evaluation during training changes from :class:`EvaluationConfig`'s defaults.
TRAINING_DEFAULTS: dict[str, Any] = {"n_samples": 100, "num_inference_steps": 10, "progress": False}


def bounded_config(config: EvaluationConfig | dict[str, Any] | None) -> EvaluationConfig:
    """An :class:`EvaluationConfig` sized for training time: :data:`TRAINING_DEFAULTS` where ``config`` is silent."""
    if isinstance(config, EvaluationConfig):
        return config
    values = {**TRAINING_DEFAULTS, **(config or {})}
    fields = set(EvaluationConfig.__dataclass_fields__)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"evaluation has unknown fields {unknown}; accepted: {sorted(fields)}.")
    return EvaluationConfig(**values)


class PeriodicEvaluation:
    """Run an :class:`Evaluator` on the module being trained every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: Epochs between evaluations.
        config: What to generate and measure (see :func:`bounded_config` for the defaults).
    """

    def __init__(self, every_n_epochs: int, config: EvaluationConfig | dict[str, Any] | None = None) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"evaluate_every_n_epochs={every_n_epochs!r} is not accepted; expected an int >= 1.")
        self.every_n_epochs = every_n_epochs
        self.config = bounded_config(config)
        self.evaluator: Evaluator | None = None
        self.last_epoch: int | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        """Load the judge and feature networks on rank 0 now, so a missing file fails before training."""
        if trainer.is_global_zero and self.evaluator is None:
            datamodule = getattr(trainer, "datamodule", None)
            self.evaluator = Evaluator(self.config, datamodule if hasattr(datamodule, "datasets") else None)

    def due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return (epoch + 1) % self.every_n_epochs == 0 and self.last_epoch != epoch

    def run(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, float]:
        """Evaluate (rank 0), log media there, and log the scalars on every rank; returns them."""
        self.last_epoch = trainer.current_epoch
        values: dict[str, float] = {}
        if trainer.is_global_zero:
            assert self.evaluator is not None
            steps, scale = sampling_defaults(pl_module, None, None)
            device = pl_module.device
            rng_devices = [device.index or 0] if device.type == "cuda" else []
            with sampling_mode(pl_module), torch.random.fork_rng(devices=rng_devices):
                pipeline = pl_module.build_pipeline(self.config.scheduler)
                result = self.evaluator.evaluate(pipeline, steps, scale)
            folder = Path(trainer.default_root_dir) / "eval" / f"epoch={trainer.current_epoch}"
            result.write(folder, epoch=trainer.current_epoch, step=trainer.global_step)
            result.log(trainer, scalars=False)
            values = {f"evals/{name}": float(value) for name, value in result.metrics().items()}
        values = trainer.strategy.broadcast(values, src=0)
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        return values
