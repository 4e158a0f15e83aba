"""diffusers pipelines."""

from diffusion_lightning.pipelines.class_conditioned import (
    ClassConditionedPipeline,
    ClassConditionedPipelineOutput,
    ClassGridOutput,
)
from diffusion_lightning.pipelines.conditioning import Conditions, ConditionSpec, condition_spec, generate

__all__ = [
    "ClassConditionedPipeline",
    "ClassConditionedPipelineOutput",
    "ClassGridOutput",
    "ConditionSpec",
    "Conditions",
    "condition_spec",
    "generate",
]
