"""Network builders."""

from diffusion_lightning.nets.class_conditioned import ClassConditionedUnet
from diffusion_lightning.nets.unet import UNetConfig, build_unet, num_classes_of

__all__ = ["ClassConditionedUnet", "UNetConfig", "build_unet", "num_classes_of"]
