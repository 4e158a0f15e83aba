"""LightningDataModules, one per dataset."""

from diffusion_lightning.data.base import DiffusionDataModule, LabelledImageDataModule, LabelledImages
from diffusion_lightning.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from diffusion_lightning.data.caption_dataset import CaptionCollate, ImageCaptions
from diffusion_lightning.data.captions import ImageCaptionDataModule
from diffusion_lightning.data.cifar import CIFAR10DataModule
from diffusion_lightning.data.mnist import MNISTDataModule
from diffusion_lightning.data.sampling import EpochSeededSampler, stratified_split

__all__ = [
    "BucketBatchSampler",
    "CIFAR10DataModule",
    "CaptionCollate",
    "DiffusionDataModule",
    "ImageCaptionDataModule",
    "ImageCaptions",
    "EpochSeededSampler",
    "LabelledImageDataModule",
    "LabelledImages",
    "MNISTDataModule",
    "make_buckets",
    "nearest_bucket",
    "stratified_split",
]
