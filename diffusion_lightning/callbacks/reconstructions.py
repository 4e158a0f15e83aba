"""Log originals and their reconstructions by an autoencoder during training, and save them as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.utils.images import label_grid, make_grid
from diffusion_lightning.utils.io import save_image

__all__ = ["ReconstructionLogger"]


class ReconstructionLogger(Callback):
    """Every few epochs, reconstruct a fixed batch: originals on the top row, reconstructions below.

    The batch is the first ``num_images`` images of the first validation batch, kept from the first
    validation after fitting starts, so successive grids differ only by the weights. At the end of every
    ``every_n_epochs``-th validation epoch, rank 0 reconstructs them with the module's ``reconstruct``
    (e.g. :class:`~diffusion_lightning.modules.autoencoder.AutoencoderKLModule`, posterior mode), logs the
    grid under ``reconstructions/grid`` and writes ``<dirpath>/epoch=EEE-step=SSSSSS.png`` atomically.

    Args:
        every_n_epochs: Log after every n-th epoch's validation (>= 1).
        num_images: Images of the fixed batch (>= 1).
        scale: Integer nearest-neighbour upscaling of the grid image (>= 1).
        dirpath: Folder of the PNGs; default ``<trainer.default_root_dir>/reconstructions``.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, scale: int = 2, dirpath: str | None = None
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("num_images", num_images), ("scale", scale)):
            if value < 1:
                raise ValueError(f"{name}={value!r} must be >= 1.")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.scale = scale
        self.dirpath = dirpath
        self.images: torch.Tensor | None = None  # the fixed batch, CPU, in [-1, 1]
        self.last_path: Path | None = None  # the PNG written last

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
        if self.images is None and not trainer.sanity_checking and batch_idx == 0 and dataloader_idx == 0:
            images = batch["images"] if isinstance(batch, dict) else batch
            self.images = images[: self.num_images].detach().cpu().clone()

    def grid(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """The ``(C, H, W)`` grid in ``[0, 1]`` at the module's current weights."""
        if self.images is None:
            raise ValueError("ReconstructionLogger has no batch yet; it keeps the first validation batch.")
        images = self.images.to(pl_module.device)
        reconstructions = pl_module.reconstruct(images)
        both = torch.cat([images, reconstructions.to(images.dtype)]).float().add(1).div(2).clamp(0, 1)
        return make_grid(both.cpu(), nrow=images.shape[0])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.images is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            picture = label_grid(self.grid(pl_module), None, scale=self.scale)
        finally:
            pl_module.train(was_training)
        log_image(trainer, "reconstructions/grid", picture)
        folder = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "reconstructions"
        self.last_path = save_image(
            picture, folder / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}.png"
        )
