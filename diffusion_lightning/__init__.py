"""diffusion_lightning: Lightning modules, data modules and callbacks for diffusion models."""

from diffusion_lightning.callbacks import (
    EMA,
    AttentionHeatmapLogger,
    CrossAttentionHeatmapLogger,
    DiffusionMetricsLogger,
    GenerationMonitor,
    GradientActivationWatcher,
    PeriodicEvaluation,
    PredictionWriter,
    ReconstructionLogger,
    RunSummary,
    SampleGridLogger,
    SamplingCallback,
    TimestepLossLogger,
)
from diffusion_lightning.data import CIFAR10DataModule, ImageCaptionDataModule, MNISTDataModule
from diffusion_lightning.modules import (
    AutoencoderKLModule,
    ClassConditionedDDPM,
    DiffusionModule,
    DiffusionStepOutput,
    DigitClassifier,
    KnowledgeDistillationModule,
    LatentDiffusionModule,
    NonFiniteLossError,
    ProgressiveDistillationModule,
)
from diffusion_lightning.modules.loading import load_module
from diffusion_lightning.nets import ClassConditionedUnet, LatentComponents, UNetConfig, build_unet
from diffusion_lightning.optim import WarmupCosineLR
from diffusion_lightning.pipelines import (
    ClassConditionedPipeline,
    ClassConditionedPipelineOutput,
    ClassGridOutput,
    Conditions,
    ConditionSpec,
)
from diffusion_lightning.schedulers import make_scheduler

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "AttentionHeatmapLogger",
    "CrossAttentionHeatmapLogger",
    "DiffusionMetricsLogger",
    "GenerationMonitor",
    "GradientActivationWatcher",
    "PeriodicEvaluation",
    "PredictionWriter",
    "ReconstructionLogger",
    "RunSummary",
    "SampleGridLogger",
    "SamplingCallback",
    "TimestepLossLogger",
    "ConditionSpec",
    "Conditions",
    "CIFAR10DataModule",
    "ImageCaptionDataModule",
    "AutoencoderKLModule",
    "ClassConditionedDDPM",
    "KnowledgeDistillationModule",
    "LatentComponents",
    "LatentDiffusionModule",
    "ClassConditionedPipeline",
    "ClassConditionedPipelineOutput",
    "ClassConditionedUnet",
    "ClassGridOutput",
    "DiffusionModule",
    "DiffusionStepOutput",
    "DigitClassifier",
    "MNISTDataModule",
    "NonFiniteLossError",
    "ProgressiveDistillationModule",
    "UNetConfig",
    "WarmupCosineLR",
    "__version__",
    "build_unet",
    "load_module",
    "make_scheduler",
]
