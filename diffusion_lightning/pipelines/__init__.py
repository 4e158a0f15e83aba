"""diffusers pipelines."""

from diffusion_lightning.pipelines.class_conditioned import (
    ClassConditionedPipeline,
    ClassConditionedPipelineOutput,
    ClassGridOutput,
)

__all__ = ["ClassConditionedPipeline", "ClassConditionedPipelineOutput", "ClassGridOutput"]
