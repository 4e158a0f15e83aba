"""Callbacks, one per file: EMA, a gradient/activation watcher, diffusion metrics, attention heatmaps
(self-attention and per-token cross-attention), sample grids and a run summary. All are configurable
from YAML (``trainer.callbacks``)."""

from diffusion_lightning.callbacks.attention import AttentionHeatmapLogger
from diffusion_lightning.callbacks.cross_attention import CrossAttentionHeatmapLogger
from diffusion_lightning.callbacks.ema import EMA
from diffusion_lightning.callbacks.metrics import DiffusionMetricsLogger
from diffusion_lightning.callbacks.samples import SampleGridLogger
from diffusion_lightning.callbacks.summary import RunSummary
from diffusion_lightning.callbacks.watcher import GradientActivationWatcher, NonFiniteGradientError

__all__ = [
    "EMA",
    "AttentionHeatmapLogger",
    "CrossAttentionHeatmapLogger",
    "DiffusionMetricsLogger",
    "GradientActivationWatcher",
    "NonFiniteGradientError",
    "RunSummary",
    "SampleGridLogger",
]
