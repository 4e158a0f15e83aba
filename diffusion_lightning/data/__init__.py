"""LightningDataModules, one per dataset."""

from diffusion_lightning.data.base import (
    DiffusionDataModule,
    EpochSeededSampler,
    LabelledImageDataModule,
    LabelledImages,
    stratified_split,
)
from diffusion_lightning.data.captions import CaptionCollate, ImageCaptionDataModule, ImageCaptions
from diffusion_lightning.data.cifar import CIFAR10DataModule
from diffusion_lightning.data.mnist import MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CaptionCollate",
    "DiffusionDataModule",
    "ImageCaptionDataModule",
    "ImageCaptions",
    "EpochSeededSampler",
    "LabelledImageDataModule",
    "LabelledImages",
    "MNISTDataModule",
    "stratified_split",
]
