"""``DiffusionMetricsLogger``: the earlier all-in-one callback, kept for existing configs (deprecated).

It now builds the three callbacks that do its jobs and forwards every hook to them:
:class:`~diffusion_lightning.callbacks.TimestepLossLogger` (loss per timestep bucket),
:class:`~diffusion_lightning.callbacks.GenerationMonitor` (generation cost, latent statistics,
trajectory) and :class:`~diffusion_lightning.callbacks.PeriodicEvaluation`; the summary figure is
:class:`~diffusion_lightning.callbacks.RunSummary`'s. New configs list those callbacks directly.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn

from diffusion_lightning.callbacks.evaluation import PeriodicEvaluation
from diffusion_lightning.callbacks.generation import GenerationMonitor
from diffusion_lightning.callbacks.timestep_loss import TimestepLossLogger

__all__ = ["DiffusionMetricsLogger"]

#: The hooks the three parts implement, forwarded to each of them in turn.
_HOOKS = (
    "setup",
    "teardown",
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_end",
    "on_validation_batch_end",
    "on_validation_epoch_end",
    "on_test_batch_end",
    "on_test_epoch_end",
    "on_exception",
)


class DiffusionMetricsLogger(Callback):
    """Deprecated: list ``TimestepLossLogger``, ``GenerationMonitor`` and ``PeriodicEvaluation`` instead.

    Takes the arguments it always took and hands each to the callback that now does that job; the
    metric names changed with the split: the validation buckets are ``val/loss_t<lo>-<hi>``
    (monitorable) instead of ``diffusion/val_loss_t<lo>-<hi>``.

    Args:
        num_buckets: See ``TimestepLossLogger``.
        log_every_n_steps: Ignored: the bucket losses follow the Trainer's ``log_every_n_steps``.
        generate_every_n_epochs: ``GenerationMonitor``'s ``every_n_epochs``; ``None`` adds no monitor.
        num_samples: See ``GenerationMonitor``.
        classes: See ``GenerationMonitor``.
        prompts: See ``GenerationMonitor``.
        num_inference_steps: See ``GenerationMonitor``.
        guidance_scale: See ``GenerationMonitor``.
        scheduler: See ``GenerationMonitor``.
        seed: See ``GenerationMonitor``.
        trajectory_num_samples: See ``GenerationMonitor``.
        trajectory_num_steps: See ``GenerationMonitor``.
        log_diffusion_metrics: Add the ``TimestepLossLogger``.
        log_latent_space: See ``GenerationMonitor``.
        log_generation_steps: See ``GenerationMonitor``.
        save_images: See ``GenerationMonitor``.
        summary_figure: Ignored: ``RunSummary`` draws the figure.
        queue_size: See ``GenerationMonitor``.
        evaluate_every_n_epochs: ``PeriodicEvaluation``'s ``every_n_epochs``; ``None`` adds none.
        evaluation: See ``PeriodicEvaluation``.
    """

    def __init__(
        self,
        num_buckets: int = 10,
        log_every_n_steps: int | None = None,
        generate_every_n_epochs: int | None = 1,
        num_samples: int = 8,
        classes: list[int] | None = None,
        prompts: list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int = 0,
        trajectory_num_samples: int = 4,
        trajectory_num_steps: int = 6,
        log_diffusion_metrics: bool = True,
        log_latent_space: bool = True,
        log_generation_steps: bool = True,
        save_images: bool = True,
        summary_figure: bool = True,
        queue_size: int = 8,
        evaluate_every_n_epochs: int | None = None,
        evaluation: dict[str, Any] | None = None,
    ) -> None:
        rank_zero_deprecation(
            "DiffusionMetricsLogger is deprecated: list TimestepLossLogger, GenerationMonitor and PeriodicEvaluation "
            "(diffusion_lightning.callbacks) instead; see configs/callbacks/default.yaml."
        )
        for name, value in (
            ("generate_every_n_epochs", generate_every_n_epochs),
            ("evaluate_every_n_epochs", evaluate_every_n_epochs),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} is not accepted; expected an int >= 1 or None.")
        if log_every_n_steps is not None:
            rank_zero_warn("DiffusionMetricsLogger(log_every_n_steps=...) is ignored; set trainer.log_every_n_steps.")
        self.timestep_loss = TimestepLossLogger(num_buckets) if log_diffusion_metrics else None
        self.generation = (
            GenerationMonitor(
                every_n_epochs=generate_every_n_epochs,
                num_samples=num_samples,
                classes=classes,
                prompts=prompts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                seed=seed,
                trajectory_num_samples=trajectory_num_samples,
                trajectory_num_steps=trajectory_num_steps,
                log_latent_space=log_latent_space,
                log_generation_steps=log_generation_steps,
                save_images=save_images,
                queue_size=queue_size,
            )
            if generate_every_n_epochs is not None
            else None
        )
        self.evaluation = (
            PeriodicEvaluation(evaluate_every_n_epochs, evaluation, classes=classes, prompts=prompts)
            if evaluate_every_n_epochs is not None
            else None
        )
        self.parts: list[Callback] = [p for p in (self.timestep_loss, self.generation, self.evaluation) if p]

    def epoch_records(self) -> list[dict[str, Any]]:
        """The parts' per-epoch records, for ``RunSummary``."""
        return [record for part in self.parts for record in getattr(part, "epoch_records", list)()]

    def state_dict(self) -> dict[str, Any]:
        return {type(part).__name__: part.state_dict() for part in self.parts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            if type(part).__name__ in state_dict:
                part.load_state_dict(state_dict[type(part).__name__])


def _forward(name: str) -> Any:
    def hook(self: DiffusionMetricsLogger, *args: Any, **kwargs: Any) -> None:
        for part in self.parts:
            getattr(part, name)(*args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = f"``{name}`` of each part, in order."
    return hook


for _name in _HOOKS:
    setattr(DiffusionMetricsLogger, _name, _forward(_name))
