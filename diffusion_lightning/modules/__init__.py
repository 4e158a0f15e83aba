"""LightningModules."""

from diffusion_lightning.modules.base import DiffusionModule, DiffusionStepOutput
from diffusion_lightning.modules.ddpm import ClassConditionedDDPM

__all__ = ["ClassConditionedDDPM", "DiffusionModule", "DiffusionStepOutput"]
