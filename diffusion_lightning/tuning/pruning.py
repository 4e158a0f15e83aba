"""Pruning callback that reports at the global step, for validations several times per epoch."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import optuna
from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback
from typing_extensions import override

from diffusion_lightning.utils.compat import pruning_keys, pruning_trial, trial_id

__all__ = ["GlobalStepPruningCallback"]


class GlobalStepPruningCallback(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback, reporting at ``trainer.global_step`` instead of the epoch.

    The parent reports ``trial.report(value, step=current_epoch)``: with ``val_check_interval``
    shorter than an epoch every validation of an epoch reports the same step, and Optuna ignores all
    but the first. Diffusion runs here are counted in optimizer steps (``max_steps``) and validate
    every few hundred steps, so this subclass reports each validation at its global step; the
    pruner's ``n_warmup_steps``/``interval_steps`` and Hyperband's resources are then optimizer
    steps too. Only the step changes: the DDP logic of the parent is kept as it is (rank 0 reports
    and asks the pruner, the decision is broadcast to every rank, intermediate values and the
    decision go to the trial's system attributes under the parent's keys, so the parent's
    :meth:`check_pruned` works unchanged after ``fit``; its message says "epoch" but holds the step).

    In a single process a pruned trial raises :class:`optuna.TrialPruned` out of ``trainer.fit``.

    Args:
        trial: The running trial.
        monitor: The metric reported (a key of ``trainer.callback_metrics``, e.g. ``val/loss``).
    """

    def __init__(self, trial: optuna.trial.Trial, monitor: str) -> None:
        super().__init__(trial, monitor)
        self.reported: list[tuple[int, float]] = []
        """``(global_step, value)`` of every report, in order (for logs and tests)."""

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        current = trainer.callback_metrics.get(self.monitor)
        if current is None:
            warnings.warn(
                f"The metric {self.monitor!r} is not in the evaluation logs for pruning; logged: "
                f"{sorted(trainer.callback_metrics)}.",
                stacklevel=2,
            )
            return
        value = float(current.item())
        step = int(trainer.global_step)
        if self.reported and self.reported[-1][0] == step:
            return  # a second validation at the same step (e.g. an extra validate): one report per step
        self.reported.append((step, value))

        trial = pruning_trial(self)
        if not self.is_ddp_backend:
            trial.report(value, step=step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"Trial was pruned at step {step} ({self.monitor}={_fmt(value)}).")
            return

        keys = pruning_keys()
        should_stop = False
        if trainer.is_global_zero:
            trial.report(value, step=step)
            should_stop = trial.should_prune()
            intermediate_values = trial.storage.get_trial_system_attrs(trial_id(trial)).get(keys.intermediate_value)
            intermediate_values = {**(intermediate_values or {}), step: value}
            trial.storage.set_trial_system_attr(trial_id(trial), keys.intermediate_value, intermediate_values)
            if should_stop:
                # stored before the broadcast: a rank that learns of the decision and leaves fit at once
                # must find it in the storage when it calls check_pruned
                trial.storage.set_trial_system_attr(trial_id(trial), keys.pruned, True)
                trial.storage.set_trial_system_attr(trial_id(trial), keys.epoch, step)
        should_stop = trainer.strategy.broadcast(should_stop)
        trainer.should_stop = trainer.should_stop or should_stop


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6g}"
