"""Log a labelled grid of generated samples during training, and save it as a PNG."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import PIL.Image
import torch
from typing_extensions import override

from diffusion_lightning.callbacks.sampling import SamplingCallback, sampling_mode
from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.pipelines.conditioning import Conditions
from diffusion_lightning.utils.images import label_grid, make_grid
from diffusion_lightning.utils.io import save_image

__all__ = ["SampleGrid", "SampleGridLogger", "sampling_mode"]

_LABEL_WIDTH = 32  # characters of a prompt shown left of its row


@dataclass
class SampleGrid:
    """What :meth:`SampleGridLogger.generate` made.

    Args:
        grid: The grid, ``(C, H, W)`` in ``[0, 1]``, one row per condition.
        pil_grid: The same grid as a PIL image, rows labelled with their class or prompt.
        images: The individual images ``(B, C, H, W)``, row-major.
        conditions: The condition of each image.
    """

    grid: torch.Tensor
    pil_grid: PIL.Image.Image
    images: torch.Tensor
    conditions: Conditions


def row_label(name: str, width: int = _LABEL_WIDTH) -> str:
    """A class name as it is, a prompt shortened to ``width`` characters."""
    return textwrap.shorten(name, width=width, placeholder="...") if len(name) > width else name


class SampleGridLogger(SamplingCallback):
    """Sample a fixed grid (one labelled row per class or prompt) every few epochs; log it and save it as a PNG.

    At the end of every ``every_n_epochs``-th validation epoch, rank 0 generates ``num_per_class``
    images of each of the callback's conditions (classes of a class-conditioned model, prompts of a
    text-to-image one; see :class:`~diffusion_lightning.callbacks.sampling.SamplingCallback`) from
    a generator seeded by ``seed``, so the grids of successive epochs start from the same noise and
    differ only by the weights. The grid goes to the loggers under ``samples/grid`` (loggers without
    images get a one-time warning) and to ``<dirpath>/epoch=EEE-step=SSSSSS.png``, written atomically.

    Args:
        every_n_epochs: Sample after every n-th epoch's validation (>= 1).
        classes: The rows of a class-conditioned model, in order; default every class.
        prompts: The rows of a text-to-image model; default the module's ``validation_prompts``.
        negative_prompts: One negative prompt per prompt, or one for all.
        num_per_class: Samples per row (>= 1), whether the row is a class or a prompt.
        seed: Seed of the sampling noise (a CPU generator, so grids match across devices).
        num_inference_steps: Denoising steps; default the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale; default the module's ``guidance_scale``.
        scheduler: Sampling scheduler (``ddpm``, ``ddim``, ``dpm``, ``euler``, ``euler_a``,
            ``unipc``); default the module's ``sampler``.
        batch_size: Images per forward pass; default the whole grid at once.
        scale: Integer nearest-neighbour upscaling of the grid image (>= 1).
        label_rows: Write each row's class name or (shortened) prompt left of it.
        dirpath: Folder of the PNGs; default ``<trainer.default_root_dir>/samples``.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        classes: list[int] | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
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
        super().__init__(
            every_n_epochs, classes, prompts, negative_prompts, seed, num_inference_steps, guidance_scale, scheduler
        )
        if num_per_class < 1:
            raise ValueError(f"num_per_class={num_per_class!r} must be >= 1.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1, or None for the whole grid.")
        if scale < 1:
            raise ValueError(f"scale={scale!r} must be >= 1.")
        self.num_per_class = num_per_class
        self.batch_size = batch_size
        self.scale = scale
        self.label_rows = label_rows
        self.dirpath = dirpath
        self.last_path: Path | None = None  # the PNG written last

    def generate(self, pl_module: DiffusionModule, conditions: Conditions | None = None, **kwargs: Any) -> SampleGrid:
        """The grid at the module's current weights; the same seed gives the same grid."""
        rows = conditions if conditions is not None else self.conditions(pl_module)
        wanted = rows.repeat_each(self.num_per_class)
        pipeline = self.pipeline(pl_module)
        generator = self.generator()
        chunk = self.batch_size or len(wanted)
        images = torch.cat(
            [
                self.sample(pl_module, wanted[i : i + chunk], pipeline=pipeline, generator=generator, **kwargs)
                for i in range(0, len(wanted), chunk)
            ]
        )
        grid = make_grid(images, nrow=self.num_per_class)
        labels = [row_label(name) for name in rows.names] if self.label_rows else None
        return SampleGrid(grid, label_grid(grid, labels, scale=self.scale), images, wanted)

    @override
    def on_sample(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        grid = self.generate(pl_module)
        log_image(trainer, "samples/grid", grid.pil_grid)
        folder = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "samples"
        self.last_path = save_image(
            grid.pil_grid, folder / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}.png"
        )
