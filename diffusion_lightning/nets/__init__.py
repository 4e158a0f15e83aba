"""Network builders."""

from diffusion_lightning.nets.class_conditioned import ClassConditionedUnet
from diffusion_lightning.nets.flux import FluxComponents, build_flux_components, load_flux_components
from diffusion_lightning.nets.latent import LatentComponents, build_components, load_components
from diffusion_lightning.nets.latent_xl import XLComponents, build_xl_components, load_xl_components
from diffusion_lightning.nets.sd3 import SD3Components, build_sd3_components, load_sd3_components
from diffusion_lightning.nets.students import build_student, describe, size_table, student_config
from diffusion_lightning.nets.unet import UNetConfig, build_unet, num_classes_of

__all__ = [
    "ClassConditionedUnet",
    "FluxComponents",
    "LatentComponents",
    "SD3Components",
    "UNetConfig",
    "XLComponents",
    "build_components",
    "build_flux_components",
    "build_sd3_components",
    "build_student",
    "describe",
    "size_table",
    "student_config",
    "build_unet",
    "build_xl_components",
    "load_components",
    "load_flux_components",
    "load_sd3_components",
    "load_xl_components",
    "num_classes_of",
]
