"""Callbacks, one per file: EMA, a gradient/activation watcher, loss per timestep bucket, a generation
monitor, periodic evaluation, attention heatmaps (self-attention and per-token cross-attention), sample
grids, autoencoder reconstructions, prediction writing and a run summary. All are configurable from YAML
(``trainer.callbacks``); the ones that generate share :class:`SamplingCallback` and work for
class-conditioned and text-to-image models.
"""

from diffusion_lightning.callbacks.attention import AttentionHeatmapLogger
from diffusion_lightning.callbacks.cross_attention import CrossAttentionHeatmapLogger
from diffusion_lightning.callbacks.ema import EMA
from diffusion_lightning.callbacks.evaluation import PeriodicEvaluation
from diffusion_lightning.callbacks.generation import GenerationMonitor
from diffusion_lightning.callbacks.metrics import DiffusionMetricsLogger
from diffusion_lightning.callbacks.predictions import PredictionWriter
from diffusion_lightning.callbacks.reconstructions import ReconstructionLogger
from diffusion_lightning.callbacks.samples import SampleGridLogger
from diffusion_lightning.callbacks.sampling import SamplingCallback
from diffusion_lightning.callbacks.summary import RunSummary
from diffusion_lightning.callbacks.timestep_loss import TimestepLossLogger
from diffusion_lightning.callbacks.watcher import GradientActivationWatcher, NonFiniteGradientError

__all__ = [
    "EMA",
    "AttentionHeatmapLogger",
    "CrossAttentionHeatmapLogger",
    "DiffusionMetricsLogger",
    "GenerationMonitor",
    "GradientActivationWatcher",
    "NonFiniteGradientError",
    "PeriodicEvaluation",
    "PredictionWriter",
    "ReconstructionLogger",
    "RunSummary",
    "SampleGridLogger",
    "SamplingCallback",
    "TimestepLossLogger",
]
