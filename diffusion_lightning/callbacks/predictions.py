"""Write what ``predict`` generates: one PNG per image, a labelled grid and a JSON of conditions and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from diffusion_lightning.callbacks.samples import row_label
from diffusion_lightning.utils.images import label_grid, make_grid, to_pil
from diffusion_lightning.utils.io import save_image, write_json

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Save the images of ``trainer.predict`` as they come, then a grid and ``predictions.json``.

    Every predict batch of a :class:`~diffusion_lightning.modules.base.DiffusionModule` (its
    ``predict_step`` returns ``images``, ``conditions`` and ``seeds``) is written at once, so an
    interrupted predict keeps what it made: ``<output_dir>/<NNNNN>.png`` numbered in the order the
    batches come (with ``rank<r>-`` in front under several processes). When the pass ends, each
    process writes ``predictions[-rank<r>].json`` (per image: file, condition - class and name, or
    prompt and negative prompt - and seed) and ``grid.png``: the first ``grid_max_images``
    images, one row per distinct condition, labelled with its class name or prompt. The
    ``diffusion-lightning predict`` command adds this writer when the config has none.

    Args:
        output_dir: Folder of the files; default ``<trainer.default_root_dir>/predictions``.
        grid_max_images: Images in ``grid.png`` at most (0: no grid).
        scale: Integer upscaling of the grid image.
    """

    def __init__(self, output_dir: str | None = None, grid_max_images: int = 64, scale: int = 2) -> None:
        super().__init__(write_interval="batch")
        if grid_max_images < 0:
            raise ValueError(f"grid_max_images={grid_max_images!r} must be >= 0.")
        if scale < 1:
            raise ValueError(f"scale={scale!r} must be >= 1.")
        self.output_dir = output_dir
        self.grid_max_images = grid_max_images
        self.scale = scale
        self.records: list[dict[str, Any]] = []
        """One entry per image written in the current pass."""
        self._grid: list[tuple[torch.Tensor, str]] = []

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "predictions"

    def _prefix(self, trainer: pl.Trainer) -> str:
        return f"rank{trainer.global_rank}-" if trainer.world_size > 1 else ""

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records, self._grid = [], []

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, dict) or "images" not in prediction:
            raise ValueError(
                f"PredictionWriter needs predict_step to return a dict with 'images'; {type(pl_module).__name__} "
                f"returned {type(prediction).__name__}."
            )
        images = prediction["images"].detach().float().cpu()
        conditions = prediction.get("conditions") or [{} for _ in range(len(images))]
        seeds = prediction.get("seeds") or [None] * len(images)
        folder, prefix = self.folder(trainer), self._prefix(trainer)
        for image, condition, seed in zip(images, conditions, seeds):
            name = f"{prefix}{len(self.records):05d}.png"
            save_image(to_pil(image), folder / name)
            self.records.append({"file": name, **condition, "seed": seed})
            if len(self._grid) < self.grid_max_images:
                label = condition.get("name", condition.get("prompt", ""))
                self._grid.append((image, str(label)))

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder, prefix = self.folder(trainer), self._prefix(trainer)
        suffix = f"-{prefix.rstrip('-')}" if prefix else ""
        write_json(folder / f"predictions{suffix}.json", {"images": self.records})
        if not self._grid:
            return
        rows: dict[str, list[torch.Tensor]] = {}
        for image, label in self._grid:
            rows.setdefault(label, []).append(image)
        width = max(len(images) for images in rows.values())
        blank = torch.ones_like(self._grid[0][0])  # white where a row has fewer images
        tiles = [images[i] if i < len(images) else blank for images in rows.values() for i in range(width)]
        grid = label_grid(make_grid(torch.stack(tiles), nrow=width), [row_label(r) for r in rows], scale=self.scale)
        save_image(grid, folder / f"grid{suffix}.png")
