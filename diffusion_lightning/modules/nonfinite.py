"""What a LightningModule does when its loss becomes NaN or infinite: stop the run, or skip the step.

:class:`NonFiniteLossGuard` is mixed into every module of the package. A diverged run must not
end as if it had finished: without the guard the Trainer keeps stepping on NaN weights, logs NaN
losses and ``ModelCheckpoint`` can keep a NaN model as the best one.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["NONFINITE_LOSS_MODES", "NonFiniteLossError", "NonFiniteLossGuard", "NonFiniteLossMode"]

NonFiniteLossMode = Literal["raise", "skip"]
NONFINITE_LOSS_MODES: tuple[str, ...] = get_args(NonFiniteLossMode)


class NonFiniteLossError(FloatingPointError):
    """A training or validation loss became NaN or infinite.

    Attributes:
        global_step: The optimizer step at which it happened (the step was not taken).
        stage: ``train`` or ``val``.
        loss: The loss value this process saw (finite when only another process's loss was not).
    """

    def __init__(self, message: str, global_step: int, stage: str, loss: float) -> None:
        super().__init__(message)
        self.global_step = global_step
        self.stage = stage
        self.loss = loss


def drop_nonfinite_step(trainer: Any, params: list[torch.Tensor], message: str, skipped: int, metric: str) -> bool:
    """Drop a non-finite step's gradients, so the optimizer leaves the weights as they are; warn and log the count.

    Shared by ``nonfinite_loss: skip`` and the gradient watcher's ``skip_nonfinite``. ``skipped`` is
    the number of skipped steps, this one included, logged as ``metric`` (rank 0). Returns ``False``
    and drops nothing when the weights themselves are non-finite: no skipping can recover then.
    """
    with torch.no_grad():
        if not math.isfinite(float(torch.nn.utils.get_total_norm(params))):
            return False
    for p in params:
        p.grad = None
    rank_zero_warn(f"{message} Skipping this optimizer step ({skipped} skipped so far).")
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({metric: float(skipped)}, step=trainer.global_step)
    return True


class NonFiniteLossGuard:
    """Mixin for a ``LightningModule``: act on a non-finite training loss; refuse a non-finite validation loss.

    The training loss of each optimizer step (every micro-batch of an accumulated step) is checked
    in ``on_before_optimizer_step``, once per step, and the processes of a distributed run agree
    on the outcome (a failure on one is a failure on all, so they stop or skip together). Then,
    with ``nonfinite_loss="raise"``, :class:`NonFiniteLossError` names the global step and the
    loss, before the optimizer updates anything; with ``"skip"`` the gradients are dropped
    (``grad = None``: the optimizer leaves the weights and its state as they are, the step still
    counts and the LR schedule advances, as ``GradientActivationWatcher(skip_nonfinite=True)`` does),
    a warning names the step, ``train/skipped_steps`` is logged and ``skipped_nonfinite_steps``
    counts them; weights that are themselves non-finite raise in any case. A step whose gradients
    were already dropped (by the watcher) is left alone.

    While fitting, a non-finite validation loss (any batch) raises :class:`NonFiniteLossError` at
    the end of the validation epoch, before ``ModelCheckpoint`` can save or rank the model.

    A subclass calls :meth:`init_nonfinite_guard` in ``__init__`` and :meth:`record_eval_loss`
    with each validation batch's loss.
    """

    nonfinite_loss: str = "raise"
    skipped_nonfinite_steps: int = 0

    def init_nonfinite_guard(self, nonfinite_loss: str) -> None:
        """Set the mode (``raise`` or ``skip``), checked here for callers other than the CLI."""
        if nonfinite_loss not in NONFINITE_LOSS_MODES:
            raise ValueError(
                f"nonfinite_loss={nonfinite_loss!r} is not supported; expected one of {list(NONFINITE_LOSS_MODES)}."
            )
        self.nonfinite_loss = nonfinite_loss
        self.skipped_nonfinite_steps = 0
        self._train_loss: torch.Tensor | None = None
        self._eval_bad: torch.Tensor | None = None
        self._eval_batches = 0

    # ------------------------------------------------------------------ training

    def on_before_backward(self, loss: torch.Tensor) -> None:
        super().on_before_backward(loss)  # type: ignore[misc]
        value = loss.detach().float()
        previous = getattr(self, "_train_loss", None)
        self._train_loss = value if previous is None else previous + value

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        loss, self._train_loss = getattr(self, "_train_loss", None), None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if loss is None or all(p.grad is None for p in params):
            return  # no backward ran, or the step was already dropped: it changes nothing
        finite = bool(torch.isfinite(loss))  # one device sync per optimizer step
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        # Every process takes the same decision: a step skipped on some of them only would split the weights.
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        step, epoch, value = trainer.global_step, trainer.current_epoch, float(loss)
        if finite:
            message = f"Non-finite training loss on another process at global step {step} (epoch {epoch})."
        else:
            message = f"Non-finite training loss at global step {step} (epoch {epoch}): train/loss is {value:g}."
        if self.nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"{message} Training stops before this step updates the weights; lower the learning rate, check "
                "the data for NaN/inf, or set nonfinite_loss: skip to skip such steps.",
                step,
                "train",
                value,
            )
        if not drop_nonfinite_step(trainer, params, message, self.skipped_nonfinite_steps + 1, "train/skipped_steps"):
            raise NonFiniteLossError(
                f"{message} The weights themselves are non-finite, so skipping steps cannot recover.",
                step,
                "train",
                value,
            )
        self.skipped_nonfinite_steps += 1

    # ------------------------------------------------------------------ validation

    def record_eval_loss(self, loss: torch.Tensor) -> None:
        """Note whether one validation batch's loss is finite (no device sync)."""
        loss = loss.detach().float()
        record = torch.stack([(~torch.isfinite(loss)).sum().float(), loss.sum()])
        previous = getattr(self, "_eval_bad", None)
        self._eval_bad = record if previous is None else previous + record
        self._eval_batches = getattr(self, "_eval_batches", 0) + 1

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # type: ignore[misc]
        bad, batches = getattr(self, "_eval_bad", None), max(1, getattr(self, "_eval_batches", 0))
        self._eval_bad, self._eval_batches = None, 0
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        if bad is None or trainer.state.fn != TrainerFn.FITTING:
            return
        count, total = bad.tolist()
        if trainer.strategy.reduce_boolean_decision(count == 0, all=True):
            return
        step = trainer.global_step
        where = "the sanity check" if trainer.sanity_checking else f"epoch {trainer.current_epoch}"
        if count:
            detail = f"in {int(count)} of {batches} batches at global step {step} ({where}): val/loss is "
            detail += f"{total / batches:g}"
        else:
            detail = f"on another process at global step {step} ({where})"
        raise NonFiniteLossError(
            f"Non-finite validation loss {detail}. This model is neither checkpointed nor ranked as the best; lower "
            "the learning rate, or check the validation data for NaN/inf.",
            step,
            "val",
            total / batches,
        )

    # ------------------------------------------------------------------ checkpoints

    def nonfinite_state(self) -> dict[str, int]:
        """What a checkpoint keeps of the guard."""
        return {"skipped_nonfinite_steps": self.skipped_nonfinite_steps}

    def load_nonfinite_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`nonfinite_state` (a checkpoint without it leaves the count at 0)."""
        self.skipped_nonfinite_steps = int((state or {}).get("skipped_nonfinite_steps", 0))
