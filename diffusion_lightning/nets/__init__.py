"""Network builders."""

from diffusion_lightning.nets.class_conditioned import ClassConditionedUnet
from diffusion_lightning.nets.latent import LatentComponents, build_components, load_components
from diffusion_lightning.nets.students import build_student, describe, size_table, student_config
from diffusion_lightning.nets.unet import UNetConfig, build_unet, num_classes_of

__all__ = [
    "ClassConditionedUnet",
    "LatentComponents",
    "UNetConfig",
    "build_components",
    "build_student",
    "describe",
    "size_table",
    "student_config",
    "build_unet",
    "load_components",
    "num_classes_of",
]
