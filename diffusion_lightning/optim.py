"""Learning-rate schedules that size themselves from the Trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to the base LR, then cosine decay to ``min_lr_ratio * base LR``.

    diffusers' ``get_cosine_schedule_with_warmup`` needs the number of training steps when it is
    built, which a YAML config cannot know; this schedule accepts ``total_steps=None`` and the
    :class:`~diffusion_lightning.modules.base.DiffusionModule` fills it in from
    ``trainer.estimated_stepping_batches`` before the first step. Stepped every optimizer step.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Steps of linear warm-up (0 disables it).
        total_steps: Steps until the end of the cosine; ``None`` = the Trainer's total steps.
        min_lr_ratio: Final LR as a fraction of the base LR, in ``[0, 1]``.
        last_epoch: Index of the last step, for resuming (``-1`` starts fresh).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1].")
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the length of the schedule (warm-up included)."""
        if total_steps < 1 or total_steps < self.warmup_steps:
            raise ValueError(f"total_steps={total_steps!r} must be >= 1 and >= warmup_steps={self.warmup_steps}.")
        self.total_steps = int(total_steps)

    def factor(self, step: int) -> float:
        """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        scale = self.factor(max(0, self.last_epoch))
        return [base * scale for base in self.base_lrs]


def optimizer_config(optimizer: Optimizer, lr_scheduler: Callable[[Optimizer], Any] | None, trainer: Any) -> Any:
    """What ``configure_optimizers`` returns: the optimizer and its per-step LR scheduler.

    A :class:`WarmupCosineLR` built without ``total_steps`` is sized from
    ``trainer.estimated_stepping_batches`` (``max_steps``, or epochs times batches).
    """
    if lr_scheduler is None:
        return optimizer
    scheduler = lr_scheduler(optimizer)
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
        total = trainer.estimated_stepping_batches
        if total is not None and total != float("inf"):
            scheduler.set_total_steps(max(int(total), scheduler.warmup_steps, 1))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
