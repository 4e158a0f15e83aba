"""LightningModules."""

from diffusion_lightning.modules.autoencoder import AutoencoderKLModule
from diffusion_lightning.modules.base import DiffusionModule, DiffusionStepOutput
from diffusion_lightning.modules.classifier import DigitClassifier
from diffusion_lightning.modules.ddpm import ClassConditionedDDPM
from diffusion_lightning.modules.distill import KnowledgeDistillationModule
from diffusion_lightning.modules.latent import LatentDiffusionModule
from diffusion_lightning.modules.nonfinite import NonFiniteLossError
from diffusion_lightning.modules.progressive import ProgressiveDistillationModule

__all__ = [
    "AutoencoderKLModule",
    "ClassConditionedDDPM",
    "DigitClassifier",
    "DiffusionModule",
    "DiffusionStepOutput",
    "LatentDiffusionModule",
    "KnowledgeDistillationModule",
    "NonFiniteLossError",
    "ProgressiveDistillationModule",
]
