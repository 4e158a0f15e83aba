"""Images, histograms, figures and text to whichever loggers a Trainer has.

Lightning's ``Logger`` interface carries only scalars and hyperparameters; media go through each
backend's own API (TensorBoard's ``SummaryWriter``, W&B's ``Image``/``Histogram``, the Neptune
logger of this package). These helpers dispatch on the logger, log from rank 0 only, and warn
once per logger and kind when a backend (CSV, say) cannot take a medium, so callbacks can log
scalars alone there.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

_WARNED: set[tuple[str, str]] = set()


def to_pil(image: Any) -> PIL.Image.Image:
    """A PIL image from a PIL image, a ``(C, H, W)`` tensor in ``[0, 1]`` or an ``(H, W[, C])`` array."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        array = image.detach().float().clamp(0, 1).cpu().numpy()
        array = array.transpose(1, 2, 0) if array.ndim == 3 else array
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array)


def _unsupported(logger: Logger, kind: str) -> None:
    key = (type(logger).__name__, kind)
    if key not in _WARNED:
        _WARNED.add(key)
        rank_zero_warn(f"{type(logger).__name__} cannot log {kind}s; only scalars are logged there.")


#: Where media go: a Trainer (its loggers, from rank 0), or loggers used outside a Trainer.
Target = Trainer | Sequence[Logger] | None


def _is_trainer(target: Any) -> bool:
    return isinstance(target, Trainer) or hasattr(target, "loggers")  # a Trainer, or a stand-in for one


def _loggers(trainer: Target) -> list[Logger]:
    if trainer is None:
        return []
    if not _is_trainer(trainer):
        return list(trainer)  # type: ignore[arg-type]
    return list(trainer.loggers) if trainer.is_global_zero else []  # type: ignore[union-attr]


def _step(trainer: Target, step: int | None) -> int | None:
    return trainer.global_step if step is None and _is_trainer(trainer) else step  # type: ignore[union-attr]


def log_image(trainer: Target, key: str, image: Any, step: int | None = None) -> bool:
    """Log one image under ``key``; ``True`` if some logger took it."""
    step = _step(trainer, step)
    done = False
    for logger in _loggers(trainer):
        if isinstance(logger, TensorBoardLogger):
            array = np.asarray(to_pil(image).convert("RGB"))
            logger.experiment.add_image(key, array, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger) or hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[to_pil(image)], step=step)
        else:
            _unsupported(logger, "image")
            continue
        done = True
    return done


def log_histogram(trainer: Target, key: str, values: torch.Tensor, step: int | None = None) -> bool:
    """Log the distribution of ``values`` under ``key``; ``True`` if some logger took it."""
    step = _step(trainer, step)
    flat = values.detach().float().flatten().cpu()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return False
    done = False
    for logger in _loggers(trainer):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(key, flat, global_step=step)
        elif isinstance(logger, WandbLogger):
            import wandb

            histogram = wandb.Histogram(np_histogram=np.histogram(flat.numpy(), bins=64))
            logger.experiment.log({key: histogram, "trainer/global_step": step})
        elif hasattr(logger, "log_histogram"):
            logger.log_histogram(key, flat, step=step)
        else:
            _unsupported(logger, "histogram")
            continue
        done = True
    return done


def log_figure(trainer: Target, key: str, figure: Any, step: int | None = None) -> bool:
    """Log a matplotlib figure (rendered to PNG) under ``key``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return log_image(trainer, key, PIL.Image.open(buffer).convert("RGB"), step)


def log_text(trainer: Target, key: str, text: str, step: int | None = None) -> bool:
    """Log a block of text (a config, a model summary) under ``key``."""
    step = _step(trainer, step)
    done = False
    for logger in _loggers(trainer):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, f"```\n{text}\n```", global_step=step)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({key: wandb.Html(f"<pre>{text}</pre>"), "trainer/global_step": step})
        elif hasattr(logger, "log_text"):
            logger.log_text(key, text, step=step)
        else:
            _unsupported(logger, "text")
            continue
        done = True
    return done
