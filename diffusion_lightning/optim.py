"""Learning-rate schedules that size themselves from the Trainer, and what ``configure_optimizers`` returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

#: Attributes of :class:`WarmupCosineLR` that say what the schedule is (its shape), as opposed to where it is.
_SHAPE = ("warmup_steps", "total_steps", "min_lr_ratio", "follows_trainer")


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to the base LR, then cosine decay to ``min_lr_ratio * base LR``.

    diffusers' ``get_cosine_schedule_with_warmup`` needs the number of training steps when it is
    built, which a YAML config cannot know; this schedule accepts ``total_steps=None`` and
    :func:`optimizer_config` (what the modules' ``configure_optimizers`` returns) fills it in from
    ``trainer.estimated_stepping_batches`` before the first step. Stepped every optimizer step.

    Resuming (``fit --ckpt_path``) restores the schedule's position, not its shape: the step
    count and base LRs come from the checkpoint, while ``warmup_steps``, ``min_lr_ratio`` and the
    length come from the current configuration, and without ``total_steps`` the length is the
    resumed Trainer's (``max_steps``, or ``max_epochs`` times the batches per epoch). So a run
    extended with a larger ``max_epochs`` or ``max_steps`` stretches its cosine over the new
    horizon: at step ``s`` the LR is what a run planned with that horizon from the start has at
    ``s``, and the extra steps train at a non-zero LR. A resume with an unchanged horizon gives
    exactly the LRs of an uninterrupted run. An explicit ``total_steps`` shorter than the
    Trainer's horizon with ``min_lr_ratio=0`` is refused by :func:`optimizer_config` (the steps
    after it would train at LR 0).

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Steps of linear warm-up (0 disables it).
        total_steps: Steps until the end of the cosine (warm-up included); ``None`` = the
            Trainer's total steps, re-read whenever fitting starts (also when resuming).
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
        self.follows_trainer = total_steps is None  # the length is the Trainer's, re-read on every fit
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (step, base LRs) and keep this schedule's shape; set the optimizer's LRs to match.

        The shape (warm-up, length, floor) is the one this scheduler was built with, so a resumed run
        follows its current configuration and Trainer; a length never set here (``None``) is taken
        from ``state_dict``. The optimizer's LRs, restored from the checkpoint before the scheduler,
        are replaced by this schedule's LRs at the restored step, which the next step trains with.
        """
        shape = {name: getattr(self, name) for name in _SHAPE}
        if shape["total_steps"] is None:
            shape["total_steps"] = state_dict.get("total_steps")
        super().load_state_dict(state_dict)
        self.__dict__.update(shape)
        if self.last_epoch >= 0:
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def optimizer_config(optimizer: Optimizer, lr_scheduler: Callable[[Optimizer], Any] | None, trainer: Any) -> Any:
    """What ``configure_optimizers`` returns: the optimizer and its LR scheduler, in Lightning's dict form.

    - A scheduler is stepped every optimizer step (``interval: step``), except a
      ``ReduceLROnPlateau``, stepped on its ``monitor`` metric after each epoch that validates
      (``interval: epoch``, ``frequency``: the Trainer's ``check_val_every_n_epoch``). Use
      ``lightning.pytorch.cli.ReduceLROnPlateau``, which takes ``monitor`` (e.g. ``val/loss``);
      torch's own class has no metric name and is refused.
    - A :class:`WarmupCosineLR` without ``total_steps`` is sized from
      ``trainer.estimated_stepping_batches`` (``max_steps``, or epochs times batches); one with
      ``total_steps`` shorter than that and ``min_lr_ratio=0`` is refused, since the steps after
      its end would train at LR 0.

    Raises:
        ValueError: For a plateau scheduler without ``monitor``, or a cosine that ends before the Trainer.
    """
    if lr_scheduler is None:
        return optimizer
    scheduler = lr_scheduler(optimizer)
    if isinstance(scheduler, ReduceLROnPlateau):
        monitor = getattr(scheduler, "monitor", None)
        if not monitor:
            raise ValueError(
                f"lr_scheduler={type(scheduler).__module__}.{type(scheduler).__name__} has no metric to watch; use "
                "lightning.pytorch.cli.ReduceLROnPlateau with init_args.monitor (e.g. monitor: val/loss)."
            )
        every = getattr(trainer, "check_val_every_n_epoch", None) if str(monitor).startswith("val") else None
        config = {"scheduler": scheduler, "monitor": monitor, "interval": "epoch", "frequency": every or 1}
        return {"optimizer": optimizer, "lr_scheduler": config}
    if isinstance(scheduler, WarmupCosineLR):
        _size_cosine(scheduler, getattr(trainer, "estimated_stepping_batches", None))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _size_cosine(scheduler: WarmupCosineLR, total: float | None) -> None:
    """Size a cosine without ``total_steps`` from the Trainer; refuse one that reaches LR 0 before the Trainer ends."""
    if total is None or total == float("inf"):
        return
    if scheduler.follows_trainer:
        scheduler.set_total_steps(max(int(total), scheduler.warmup_steps, 1))
        return
    end = scheduler.total_steps
    if end is not None and end < total and scheduler.min_lr_ratio == 0:
        raise ValueError(
            f"WarmupCosineLR total_steps={end} ends before the Trainer's {int(total)} optimizer steps, and with "
            f"min_lr_ratio=0 the last {int(total) - end} would train at LR 0; leave total_steps unset (null) to "
            "follow the Trainer, raise it, or set min_lr_ratio > 0."
        )
