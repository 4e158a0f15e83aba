"""A small CNN that reads digits: the judge of generated samples and a domain feature extractor."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim import AdamW
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from diffusion_lightning.modules.nonfinite import NonFiniteLossGuard, NonFiniteLossMode
from diffusion_lightning.optim import optimizer_config


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DigitClassifier(NonFiniteLossGuard, LightningModule):
    """A VGG-style CNN over images in ``[-1, 1]`` (batches as the data modules yield them).

    ``forward`` returns logits; :meth:`features` the penultimate-layer embedding, which serves as
    the feature space of a domain FID and of precision/recall on digits. Training applies small
    random shifts, rotations and scalings per sample (an ``affine_grid`` on the batch, so no
    per-image Python work), which makes the judge robust to the off-centre digits a generator
    produces. A non-finite loss stops training or skips the step as ``nonfinite_loss`` says (see
    :class:`~diffusion_lightning.modules.nonfinite.NonFiniteLossGuard`).

    Args:
        num_classes: Number of classes (linked from the data module by the CLI).
        image_size: Input height and width (linked from the data module).
        in_channels: Input channels (linked from the data module).
        class_names: Class names (linked from the data module; kept for reports).
        channels: Widths of the three convolution stages.
        feature_dim: Size of the penultimate embedding.
        dropout: Dropout before the last layer.
        augment: Random affine augmentation during training.
        learning_rate: Learning rate of every parameter group.
        optimizer: Optimizer factory.
        lr_scheduler: LR scheduler factory, stepped every optimizer step; ``None`` keeps the LR.
            ``lightning.pytorch.cli.ReduceLROnPlateau`` with ``monitor: val/loss`` is stepped on that
            metric after each validation instead.
        nonfinite_loss: On a NaN or infinite training loss, ``raise`` (stop, naming the step and
            the loss) or ``skip`` (drop that optimizer step's gradients, warn, and go on).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 28,
        in_channels: int = 1,
        class_names: list[str] | None = None,
        channels: tuple[int, int, int] = (32, 64, 128),
        feature_dim: int = 128,
        dropout: float = 0.3,
        augment: bool = True,
        learning_rate: float = 2e-3,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        nonfinite_loss: NonFiniteLossMode = "raise",
    ) -> None:
        super().__init__()
        self.init_nonfinite_guard(nonfinite_loss)
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be >= 2.")
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels={channels!r} must be three positive widths.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1).")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate!r} must be > 0.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_classes = num_classes
        self.class_names = class_names
        self.augment = augment
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            _conv(in_channels, c1),
            _conv(c1, c1),
            nn.MaxPool2d(2),
            _conv(c1, c2),
            _conv(c2, c2),
            nn.MaxPool2d(2),
            _conv(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c3, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``(B, feature_dim)`` of images in ``[-1, 1]``."""
        return self.body(images)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` (eval mode for the call)."""
        was_training = self.training
        self.eval()
        try:
            return self(images.to(self.device, self.dtype)).softmax(dim=-1)
        finally:
            self.train(was_training)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        angle = (torch.rand(b, device=images.device) - 0.5) * math.radians(20)
        scale = 1.0 + (torch.rand(b, device=images.device) - 0.5) * 0.2
        shift = (torch.rand(b, 2, device=images.device) - 0.5) * 0.2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Background is -1: shift into [0, 2] so zero padding is background, then back.
        return F.grid_sample(images + 1.0, grid, padding_mode="zeros", align_corners=False) - 1.0

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = self._augment(batch["images"]) if self.augment else batch["images"]
        loss = F.cross_entropy(self(images), batch["labels"], label_smoothing=0.05)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch["images"])
        metric(logits, batch["labels"])
        size = batch["labels"].shape[0]
        loss = F.cross_entropy(logits, batch["labels"])
        if stage == "val":
            self.record_eval_loss(loss)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=size)
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=size)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch["images"] if isinstance(batch, dict) else batch
        probs = self(images).softmax(dim=-1)
        return {"probs": probs, "labels": probs.argmax(dim=-1)}

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([{"params": self.parameters(), "lr": self.learning_rate}])
        return optimizer_config(optimizer, self.lr_scheduler_factory, self.trainer)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffusion_lightning"] = self.nonfinite_state()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_nonfinite_state(checkpoint.get("diffusion_lightning"))
