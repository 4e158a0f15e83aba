"""Log the loss per noise level: which timesteps a diffusion model has learned and which it has not."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from diffusion_lightning.metrics.timestep import TimestepLoss
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.utils.compat import forget_step_values, should_update_logs

__all__ = ["TimestepLossLogger"]

_STAGES = {"validation": "val", "test": "test"}


class TimestepLossLogger(Callback):
    """The loss in each of ``num_buckets`` equal timestep ranges, logged with ``LightningModule.log``.

    Training: ``diffusion/loss`` and ``diffusion/loss_t<lo>-<hi>`` (inclusive, zero-padded bounds,
    e.g. ``diffusion/loss_t000-099``) are the mean unweighted per-sample loss since the previous
    log, written at the Trainer's ``log_every_n_steps``, so loss against noise level reads as a
    curve. Validation and test: ``val/loss_t<lo>-<hi>`` (``test/...``) over the whole pass, on the
    module's fixed noise and stratified timesteps, so ``EarlyStopping(monitor="val/loss_t900-999")``
    or a ``ModelCheckpoint`` can watch one noise level. The sums are a torchmetrics
    :class:`~diffusion_lightning.metrics.timestep.TimestepLoss` kept on the device; under
    data-parallel training the metric's own reduction gives the mean over every process.

    The per-epoch bucket means (:attr:`history`) travel in checkpoints;
    :class:`~diffusion_lightning.callbacks.RunSummary` draws them in ``summary.png`` and writes them
    to ``metrics.json``. The module's steps must return ``per_sample_loss`` and ``timesteps`` (every
    :class:`~diffusion_lightning.modules.base.DiffusionModule` does).

    Args:
        num_buckets: Number of timestep buckets over ``[0, T)``, from 1 to ``T``.
        train: Log the training buckets.
        val: Log the validation and test buckets.
    """

    def __init__(self, num_buckets: int = 10, train: bool = True, val: bool = True) -> None:
        if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or num_buckets < 1:
            raise ValueError(f"num_buckets={num_buckets!r} is not accepted; expected an int >= 1.")
        self.num_buckets = num_buckets
        self.train = train
        self.val = val
        self.history: list[dict[str, Any]] = []
        """One record per epoch: ``train_loss_per_bucket`` and ``val_loss_per_bucket`` (``None`` for empty buckets)."""
        self._window: TimestepLoss | None = None  # since the last training log
        self._epoch: TimestepLoss | None = None  # this training epoch
        self._eval: TimestepLoss | None = None  # this validation or test pass
        self._epoch_index: int | None = None  # the epoch whose sums _epoch holds
        self._pending_state: dict[str, Any] | None = None
        self._warned_outputs = False

    @property
    def bucket_edges(self) -> list[tuple[int, int]]:
        """Inclusive ``(lo, hi)`` timesteps of each bucket (known once set up)."""
        return list(self._window.edges) if self._window is not None else []

    def bucket_names(self) -> list[str]:
        """The metric suffix of each bucket, ``t<lo>-<hi>``."""
        return list(self._window.names) if self._window is not None else []

    def epoch_records(self) -> list[dict[str, Any]]:
        """The per-epoch records, for :class:`~diffusion_lightning.callbacks.RunSummary`."""
        return self.history

    # ------------------------------------------------------------------ set-up and state

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DiffusionModule):
            raise ValueError(f"TimestepLossLogger needs a DiffusionModule, got {type(pl_module).__name__}.")
        steps = int(pl_module.noise_scheduler.config.num_train_timesteps)
        if self.num_buckets > steps:
            raise ValueError(f"num_buckets={self.num_buckets!r} must be in 1..num_train_timesteps={steps}.")
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
        self._window, self._epoch, self._eval = (
            TimestepLoss(self.num_buckets, steps).set_dtype(dtype).to(pl_module.device) for _ in range(3)
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"bucket_edges": self.bucket_edges, "history": [dict(r) for r in self.history]}
        if self._window is not None and self._epoch is not None:
            state["window"] = {k: v.cpu() for k, v in self._window.metric_state.items()}
            state["epoch"] = {k: v.cpu() for k, v in self._epoch.metric_state.items()}
            state["epoch_index"] = self._epoch_index
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [tuple(edge) for edge in state_dict.get("bucket_edges", [])]
        if saved != self.bucket_edges:
            rank_zero_warn(
                f"The checkpoint's TimestepLossLogger had timestep buckets {saved}, this one {self.bucket_edges}; "
                "its history is not restored."
            )
            return
        self.history = [dict(record) for record in state_dict.get("history", [])]
        self._pending_state = state_dict

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending_state = self._pending_state, None
        if not state or "window" not in state or self._window is None or self._epoch is None:
            return
        self._epoch_index = state.get("epoch_index")
        if not trainer.is_global_zero:  # the saved sums are rank 0's: count them once
            return
        for metric, saved in ((self._window, state["window"]), (self._epoch, state["epoch"])):
            for name, value in saved.items():
                getattr(metric, name).copy_(value)

    # ------------------------------------------------------------------ helpers

    def _losses(self, outputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if isinstance(outputs, dict) and "per_sample_loss" in outputs and "timesteps" in outputs:
            return outputs["per_sample_loss"], outputs["timesteps"]
        if not self._warned_outputs:
            self._warned_outputs = True
            rank_zero_warn("The step returned no 'per_sample_loss' and 'timesteps'; loss buckets are not logged.")
        return None

    @staticmethod
    def _means(metric: TimestepLoss) -> tuple[list[float | None], float | None]:
        """Synced bucket means and overall mean (``None`` where empty); resets the metric."""
        values = torch.cat([metric.compute(), metric.overall().reshape(1)]).tolist()
        metric.reset()
        clean = [None if math.isnan(v) else v for v in values]
        return clean[:-1], clean[-1]

    def _log(self, pl_module: pl.LightningModule, prefix: str, means: list[float | None], total: float | None) -> None:
        values = {f"{prefix}_{name}": mean for name, mean in zip(self.bucket_names(), means) if mean is not None}
        if total is not None:
            values[prefix] = total
        on_step = prefix.startswith("diffusion/")
        if on_step:  # an empty bucket is left out of this step's log, not repeated from an earlier one
            empty = {f"{prefix}_{name}" for name in self.bucket_names()} - set(values)
            forget_step_values(pl_module.trainer, empty)
        for name, value in values.items():  # already reduced over processes by the metric
            pl_module.log(name, value, on_step=on_step, on_epoch=not on_step, sync_dist=False, batch_size=1)

    def _record(self, epoch: int, step: int) -> dict[str, Any]:
        record = next((r for r in self.history if r["epoch"] == epoch), None)
        if record is None:
            record = {"epoch": epoch, "step": step}
            self.history.append(record)
            self.history.sort(key=lambda r: r["epoch"])
        record["step"] = max(record["step"], step)
        return record

    def _finish_epoch(self, trainer: pl.Trainer) -> None:
        assert self._epoch is not None
        if self._epoch_index is None:
            return
        means, _ = self._means(self._epoch)
        if any(mean is not None for mean in means):
            self._record(self._epoch_index, trainer.global_step)["train_loss_per_bucket"] = means
        self._epoch_index = None

    # ------------------------------------------------------------------ training

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint written at validation end holds the sums of an epoch whose end hook had not run yet.
        if self.train and self._epoch_index not in (None, trainer.current_epoch):
            self._finish_epoch(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.train or self._window is None or self._epoch is None:
            return
        losses = self._losses(outputs)
        if losses is None:
            return
        self._window.update(*losses)
        self._epoch.update(*losses)
        self._epoch_index = trainer.current_epoch
        if should_update_logs(trainer):
            self._log(pl_module, "diffusion/loss", *self._means(self._window))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train and self._epoch is not None:
            self._finish_epoch(trainer)

    # ------------------------------------------------------------------ validation and test

    def _eval_batch(self, trainer: pl.Trainer, outputs: Any) -> None:
        if trainer.sanity_checking or not self.val or self._eval is None:
            return
        losses = self._losses(outputs)
        if losses is not None:
            self._eval.update(*losses)

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.sanity_checking or not self.val or self._eval is None:
            return
        means, total = self._means(self._eval)
        if total is None:
            return
        self._log(pl_module, f"{stage}/loss", means, None)
        if stage == "val" and trainer.state.fn == TrainerFn.FITTING:
            self._record(trainer.current_epoch, trainer.global_step)["val_loss_per_bucket"] = means

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, outputs)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "val")

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, outputs)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test")
