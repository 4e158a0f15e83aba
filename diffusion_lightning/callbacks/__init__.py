"""Callbacks, one per file: EMA, a gradient/activation watcher, loss per timestep bucket, a generation
monitor, periodic evaluation, attention heatmaps (self-attention and per-token cross-attention), sample
grids, autoencoder reconstructions, prediction writing, a run summary, a Prometheus endpoint and a
checkpoint on SIGTERM. All are configurable from YAML (``trainer.callbacks``); the ones that generate
share :class:`SamplingCallback` and work for class-conditioned and text-to-image models.
:func:`batch_size` counts a batch's samples for Lightning's ``ThroughputMonitor``
(``batch_size_fn: diffusion_lightning.callbacks.batch_size`` in YAML).
"""

from diffusion_lightning.callbacks.attention import AttentionHeatmapLogger
from diffusion_lightning.callbacks.cross_attention import CrossAttentionHeatmapLogger
from diffusion_lightning.callbacks.ema import EMA
from diffusion_lightning.callbacks.evaluation import PeriodicEvaluation
from diffusion_lightning.callbacks.generation import GenerationMonitor
from diffusion_lightning.callbacks.graceful_stop import CheckpointOnSigterm
from diffusion_lightning.callbacks.metrics import DiffusionMetricsLogger
from diffusion_lightning.callbacks.predictions import PredictionWriter
from diffusion_lightning.callbacks.prometheus import PrometheusMonitor
from diffusion_lightning.callbacks.reconstructions import ReconstructionLogger
from diffusion_lightning.callbacks.samples import SampleGridLogger
from diffusion_lightning.callbacks.sampling import SamplingCallback
from diffusion_lightning.callbacks.summary import RunSummary
from diffusion_lightning.callbacks.throughput import batch_size
from diffusion_lightning.callbacks.timestep_loss import TimestepLossLogger
from diffusion_lightning.callbacks.watcher import GradientActivationWatcher, NonFiniteGradientError

__all__ = [
    "EMA",
    "AttentionHeatmapLogger",
    "CheckpointOnSigterm",
    "CrossAttentionHeatmapLogger",
    "DiffusionMetricsLogger",
    "GenerationMonitor",
    "GradientActivationWatcher",
    "NonFiniteGradientError",
    "PeriodicEvaluation",
    "PredictionWriter",
    "PrometheusMonitor",
    "ReconstructionLogger",
    "RunSummary",
    "SampleGridLogger",
    "SamplingCallback",
    "TimestepLossLogger",
    "batch_size",
]
