"""Log a labelled grid of generated samples during training, and save it as a PNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.schedulers import SCHEDULERS
from diffusion_lightning.utils.io import save_image

__all__ = [
    "SampleGridLogger",
    "check_classes",
    "check_sampling_args",
    "diffusion_module",
    "sampling_defaults",
    "sampling_due",
    "sampling_mode",
    "warn_if_after_weight_averaging",
]


# ---------------------------------------------------------------------- helpers shared by sampling callbacks


@contextlib.contextmanager
def sampling_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; every submodule's train/eval mode comes back after, also on error."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def diffusion_module(pl_module: pl.LightningModule, owner: Callback) -> DiffusionModule:
    """``pl_module`` as a :class:`DiffusionModule` (what sampling callbacks need: a pipeline, a denoiser, defaults)."""
    if not isinstance(pl_module, DiffusionModule):
        raise ValueError(
            f"{type(owner).__name__} needs a DiffusionModule (build_pipeline, denoiser, sampling defaults); "
            f"got {type(pl_module).__name__}."
        )
    return pl_module


def sampling_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether a sampling callback runs at this validation end: rank 0, no sanity check, every n-th epoch."""
    return trainer.is_global_zero and not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0


def check_classes(classes: Sequence[int] | None, num_classes: int, field: str = "classes") -> list[int]:
    """``classes`` (default: all) after checking them against ``0..num_classes-1``; ``ValueError`` names ``field``."""
    if classes is None:
        return list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"{field}={list(classes)!r} has {bad}; the model's classes are 0..{num_classes - 1}.")
    return list(classes)


def warn_if_after_weight_averaging(trainer: pl.Trainer, callback: Callback) -> None:
    """Warn when ``callback`` comes after a ``WeightAveraging`` (EMA) callback.

    Lightning's ``WeightAveraging`` swaps the averaged weights in at ``on_validation_epoch_start``
    and back out in its own ``on_validation_epoch_end``; callbacks run in list order, so a sampler
    listed after it would sample the raw training weights. This package's ``EMA`` swaps at
    ``on_validation_start``/``on_validation_end`` instead, so any order works with it.
    """
    callbacks = list(getattr(trainer, "callbacks", []))
    if callback not in callbacks:
        return
    mine = callbacks.index(callback)
    swaps_at_epoch_end = [
        c
        for c in callbacks[:mine]
        if isinstance(c, WeightAveraging) and type(c).on_validation_epoch_end is WeightAveraging.on_validation_epoch_end
    ]
    if swaps_at_epoch_end:
        rank_zero_warn(
            f"{type(callback).__name__} is listed after a WeightAveraging (EMA) callback, so it samples the "
            "training weights, not the averaged ones; list it before the EMA callback."
        )


def sampling_defaults(
    pl_module: DiffusionModule, num_inference_steps: int | None, guidance_scale: float | None
) -> tuple[int, float]:
    """A sampling callback's steps and guidance scale, the module's own where the callback gives ``None``."""
    steps = num_inference_steps or pl_module.num_inference_steps
    guidance = pl_module.guidance_scale if guidance_scale is None else guidance_scale
    return steps, float(guidance)


def check_sampling_args(
    every_n_epochs: int, num_inference_steps: int | None, guidance_scale: float | None, scheduler: str | None
) -> None:
    """Raise ``ValueError`` naming the first bad common argument of a sampling callback."""
    if every_n_epochs < 1:
        raise ValueError(f"every_n_epochs={every_n_epochs!r} must be >= 1.")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be >= 1, or None for the model's.")
    if guidance_scale is not None and guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale!r} must be >= 0 (1 disables guidance), or None.")
    if scheduler is not None:
        check_choice("scheduler", scheduler, tuple(SCHEDULERS))


# ---------------------------------------------------------------------- the callback


class SampleGridLogger(Callback):
    """Sample a fixed grid (one labelled row per class) every few epochs; log it and save it as a PNG.

    At the end of every ``every_n_epochs``-th validation epoch, rank 0 builds the module's
    pipeline (``build_pipeline``) and calls its ``generate_grid`` with a generator seeded by
    ``seed``, so the grids of successive epochs start from the same noise and differ only by the
    weights. The grid goes to the loggers under ``samples/grid`` (loggers without images get a
    one-time warning) and to ``<dirpath>/epoch=EEE-step=SSSSSS.png``, written atomically.

    Sampling happens while validation runs, so with ``EMAWeightAveraging`` the averaged weights
    are used, provided this callback is listed before the EMA callback. Epochs in which validation
    does not run (``check_val_every_n_epoch``) log nothing.

    Args:
        every_n_epochs: Sample after every n-th epoch's validation (>= 1).
        classes: The rows, in order; default every class of the model.
        num_per_class: Samples per row (>= 1).
        seed: Seed of the sampling noise (a CPU generator, so grids match across devices).
        num_inference_steps: Denoising steps; default the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale; default the module's ``guidance_scale``.
        scheduler: Sampling scheduler (``ddpm``, ``ddim``, ``dpm``, ``euler``, ``euler_a``,
            ``unipc``); default the module's ``sampler``.
        batch_size: Images per forward pass; default the whole grid at once.
        scale: Integer nearest-neighbour upscaling of the grid image (>= 1).
        label_rows: Write each row's class (or class name) left of it.
        dirpath: Folder of the PNGs; default ``<trainer.default_root_dir>/samples``.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        classes: list[int] | None = None,
        num_per_class: int = 4,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        batch_size: int | None = None,
        scale: int = 2,
        label_rows: bool = True,
        dirpath: str | None = None,
    ) -> None:
        check_sampling_args(every_n_epochs, num_inference_steps, guidance_scale, scheduler)
        if classes is not None and len(classes) == 0:
            raise ValueError("classes=[] is empty; give at least one class, or None for all.")
        if num_per_class < 1:
            raise ValueError(f"num_per_class={num_per_class!r} must be >= 1.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1, or None for the whole grid.")
        if scale < 1:
            raise ValueError(f"scale={scale!r} must be >= 1.")
        self.every_n_epochs = every_n_epochs
        self.classes = None if classes is None else [int(c) for c in classes]
        self.num_per_class = num_per_class
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.scale = scale
        self.label_rows = label_rows
        self.dirpath = dirpath
        self.last_path: Path | None = None  # the PNG written last

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pipeline = diffusion_module(pl_module, self).build_pipeline(self.scheduler)
        check_classes(self.classes, pipeline.num_classes)
        warn_if_after_weight_averaging(trainer, self)

    def generate(self, pl_module: DiffusionModule) -> Any:
        """The grid at the module's current weights (a ``ClassGridOutput``); the same seed gives the same grid."""
        pipeline = pl_module.build_pipeline(self.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        steps, guidance = sampling_defaults(pl_module, self.num_inference_steps, self.guidance_scale)
        with sampling_mode(pl_module):
            return pipeline.generate_grid(
                num_per_class=self.num_per_class,
                classes=check_classes(self.classes, pipeline.num_classes),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(self.seed),
                batch_size=self.batch_size,
                scale=self.scale,
                label_rows=self.label_rows,
            )

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not sampling_due(trainer, self.every_n_epochs):
            return
        grid = self.generate(diffusion_module(pl_module, self))
        log_image(trainer, "samples/grid", grid.pil_grid)
        folder = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "samples"
        self.last_path = save_image(
            grid.pil_grid, folder / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}.png"
        )
