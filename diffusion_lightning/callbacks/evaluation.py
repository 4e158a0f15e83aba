"""Evaluation during training: the ``evaluate`` command's scoring, every N epochs, on a bounded budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from diffusion_lightning.callbacks.sampling import SamplingCallback, sampling_mode
from diffusion_lightning.metrics.evaluator import EvaluationConfig, Evaluator
from diffusion_lightning.modules.base import DiffusionModule

__all__ = ["TRAINING_DEFAULTS", "PeriodicEvaluation", "bounded_config"]


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


class PeriodicEvaluation(SamplingCallback):
    """Run the ``evaluate`` command's :class:`~diffusion_lightning.metrics.Evaluator` every few epochs while fitting.

    Rank 0 generates and scores (with this package's ``EMA``, the averaged weights) the model's
    classes, or for a text-to-image model the ``prompts`` (default its ``validation_prompts``),
    spread over ``evaluation.n_samples``; files go to ``<default_root_dir>/eval/epoch=<e>/`` and the
    grids and per-class/per-prompt table to the loggers. The scalars are broadcast and logged on
    every rank with ``LightningModule.log``, so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor
    ``evals/accuracy`` or ``evals/fid`` under any strategy. The judge and feature networks load at
    ``setup``, so a missing weights file fails before training.

    Args:
        every_n_epochs: Epochs between evaluations (>= 1).
        evaluation: What to generate and measure: fields of
            :class:`~diffusion_lightning.metrics.EvaluationConfig` (its seed, steps, guidance and
            scheduler included), where 100 samples, 10 sampling steps and no progress bars replace
            its defaults.
        classes: Classes to evaluate (class-conditioned models); default every class.
        prompts: Prompts to evaluate (text-to-image models); default the module's ``validation_prompts``.
        negative_prompts: One negative prompt per prompt, or one for all.
    """

    rank_zero_only = False  # every rank receives and logs the broadcast scalars

    def __init__(
        self,
        every_n_epochs: int = 5,
        evaluation: dict[str, Any] | None = None,
        classes: list[int] | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
    ) -> None:
        config = bounded_config(evaluation)
        super().__init__(
            every_n_epochs,
            classes,
            prompts,
            negative_prompts,
            seed=config.seed,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            scheduler=config.scheduler,
        )
        self.config = config
        self.evaluator: Evaluator | None = None

    @override
    def check(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        """Load the judge and feature networks on rank 0 now, so a missing file fails before training."""
        if trainer.state.fn == TrainerFn.FITTING and trainer.is_global_zero and self.evaluator is None:
            datamodule = getattr(trainer, "datamodule", None)
            self.evaluator = Evaluator(self.config, datamodule if hasattr(datamodule, "datasets") else None)

    def run(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> dict[str, float]:
        """Evaluate (rank 0), log media there, and log the scalars on every rank; returns them."""
        values: dict[str, float] = {}
        if trainer.is_global_zero:
            assert self.evaluator is not None
            steps, scale = self.sampling_args(pl_module)
            with sampling_mode(pl_module):
                result = self.evaluator.evaluate(
                    self.pipeline(pl_module),
                    steps,
                    scale,
                    conditions=self.conditions(pl_module),
                    image_size=getattr(pl_module, "image_size", None),
                )
            folder = Path(trainer.default_root_dir) / "eval" / f"epoch={trainer.current_epoch}"
            result.write(folder, epoch=trainer.current_epoch, step=trainer.global_step)
            result.log(trainer, scalars=False)
            values = {f"evals/{name}": float(value) for name, value in result.metrics().items()}
        values = trainer.strategy.broadcast(values, src=0)
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.record(trainer, evals=values)
        return values

    @override
    def on_sample(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        self.run(trainer, pl_module)
