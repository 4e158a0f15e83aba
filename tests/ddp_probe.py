"""A callback the multi-process tests add to a CLI run: each process records what it saw, in files of its own.

Every process writes ``<path>/rank<r>.json`` (losses, batches, step counters) and ``<path>/rank<r>.pt``
(EMA and trained weights) when fitting ends, so a test can recompute from all processes what the
loggers show and check that the processes agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from diffusion_lightning.callbacks import EMA


def _ema(trainer: pl.Trainer) -> EMA | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


class DDPProbe(Callback):
    """Record, on every process, the per-step losses, the validation outputs, the batches and the EMA state.

    Args:
        path: Folder of the records.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.record: dict[str, Any] = {"train": [], "val": []}
        self._tensors: dict[str, Any] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = _ema(trainer)
        average = ema.average_model if ema is not None else None
        self.record.update(
            pid=os.getpid(),
            global_rank=trainer.global_rank,
            world_size=trainer.world_size,
            start_step=trainer.global_step,
            start_n_averaged=int(average.n_averaged) if average is not None else None,
        )
        if average is not None:
            self._tensors["start_average"] = {k: v.detach().clone() for k, v in average.module.state_dict().items()}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["train"].append(
            {
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "global_step": trainer.global_step,
                "loss": float(outputs["loss"]),
                "labels": batch["labels"].tolist(),
                "image_sums": batch["images"].flatten(1).sum(1).tolist(),
            }
        )

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
        if trainer.sanity_checking:
            return
        self.record["val"].append(
            {
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "loss": float(outputs["loss"]),
                "per_sample_loss": outputs["per_sample_loss"].tolist(),
                "timesteps": outputs["timesteps"].tolist(),
            }
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = _ema(trainer)
        self.record["end_step"] = trainer.global_step
        if ema is not None and ema.average_model is not None:
            # After training the module holds the EMA weights and the averaged copy the raw ones.
            self._tensors["end_module"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self._tensors["end_copy"] = {k: v.detach().clone() for k, v in ema.average_model.state_dict().items()}
        folder = Path(self.path)
        folder.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (folder / f"rank{rank}.json").write_text(json.dumps(self.record))
        torch.save(self._tensors, folder / f"rank{rank}.pt")
