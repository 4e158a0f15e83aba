"""LightningModules."""

from diffusion_lightning.modules.autoencoder import AutoencoderKLModule
from diffusion_lightning.modules.base import DiffusionModule, DiffusionStepOutput
from diffusion_lightning.modules.classifier import DigitClassifier
from diffusion_lightning.modules.ddpm import ClassConditionedDDPM
from diffusion_lightning.modules.distill import KnowledgeDistillationModule
from diffusion_lightning.modules.flux import FluxModule
from diffusion_lightning.modules.latent import LatentDiffusionModule
from diffusion_lightning.modules.latent_xl import StableDiffusionXLModule
from diffusion_lightning.modules.nonfinite import NonFiniteLossError
from diffusion_lightning.modules.progressive import ProgressiveDistillationModule
from diffusion_lightning.modules.sd3 import StableDiffusion3Module

__all__ = [
    "AutoencoderKLModule",
    "ClassConditionedDDPM",
    "DigitClassifier",
    "DiffusionModule",
    "DiffusionStepOutput",
    "FluxModule",
    "LatentDiffusionModule",
    "KnowledgeDistillationModule",
    "NonFiniteLossError",
    "ProgressiveDistillationModule",
    "StableDiffusion3Module",
    "StableDiffusionXLModule",
]
