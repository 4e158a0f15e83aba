"""The CLI's checkpoint callback: the best checkpoint by a metric, and ``last.ckpt`` at every save point."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the run's latest state after every validation.

    Since Lightning 2.6, ``save_last=True`` writes ``last.ckpt`` only at a step where a top-k
    checkpoint was saved too; with ``save_top_k=1`` on ``val/loss`` that is only when the loss
    improves, so ``last.ckpt`` stays at the best step and ``fit --ckpt_path last``, ``export`` and
    ``sample`` of ``last.ckpt`` silently use older weights than the run's (a fine-tune whose
    held-out loss stops improving early kept its step-60 weights after 600 steps). This subclass
    writes ``last.ckpt`` wherever :class:`ModelCheckpoint` considers saving (the end of each
    validation, or of each training epoch when it saves there) and has not saved it at this step
    already; everything else is Lightning's.
    """

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved == trainer.global_step:
            return  # a checkpoint was saved at this step, and Lightning's last.ckpt with it
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
