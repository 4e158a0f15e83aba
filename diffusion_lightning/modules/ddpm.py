"""Class-conditioned DDPM in pixel space with classifier-free guidance."""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.nets.unet import UNetConfig, build_unet
from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline


def drop_class_labels(
    labels: torch.Tensor, p_uncond: float, null_class: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``p_uncond`` (classifier-free guidance training)."""
    if p_uncond == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class ClassConditionedDDPM(DiffusionModule):
    """A class-conditioned denoiser trained for classifier-free guidance.

    Batches are dicts with ``images`` in ``[-1, 1]`` (``B, C, H, W``) and integer ``labels``. With
    probability ``p_uncond`` a label is replaced by the null class ``num_classes`` so the same
    network also learns the unconditional prediction that guidance extrapolates from.

    Args:
        num_classes: Number of classes (linked from the data module by the CLI).
        image_size: Height and width of the images (linked from the data module).
        in_channels: Image channels (linked from the data module).
        net: The UNet's architecture.
        p_uncond: Probability of training a sample with the null class, in ``[0, 1)``.
        class_names: Optional class names, stored in exported pipelines to label grids.
        **kwargs: The shared training options of :class:`DiffusionModule` (noise schedule,
            prediction type, loss, optimizer, LR schedule, sampling defaults).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 28,
        in_channels: int = 1,
        net: UNetConfig | None = None,
        p_uncond: float = 0.1,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond={p_uncond!r} must be in [0, 1).")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries, expected num_classes={num_classes}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_classes = num_classes
        self.p_uncond = p_uncond
        self.class_names = class_names
        self.net_config = net if net is not None else UNetConfig()
        self.unet = build_unet(
            self.net_config, sample_size=image_size, in_channels=in_channels, num_classes=num_classes
        )

    @property
    @override
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @override
    def unpack_batch(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["images"], batch["labels"]

    @override
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, class_labels=condition).sample

    @override
    def drop_condition(self, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return drop_class_labels(condition, self.p_uncond, self.num_classes, generator)

    @override
    def build_pipeline(self, scheduler: str | None = None) -> ClassConditionedPipeline:
        return ClassConditionedPipeline(
            unet=self.unet, scheduler=self.sampling_scheduler(scheduler), class_names=self.class_names
        )
