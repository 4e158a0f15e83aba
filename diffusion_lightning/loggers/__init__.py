"""Loggers and logging helpers: media across Lightning loggers, a Neptune logger, resume and fork."""

from diffusion_lightning.loggers.media import log_figure, log_histogram, log_image, log_text
from diffusion_lightning.loggers.neptune import NeptuneLogger
from diffusion_lightning.loggers.runs import RunLineage, RunPlan, find_last_checkpoint, plan_run, read_lineage

__all__ = [
    "NeptuneLogger",
    "RunLineage",
    "RunPlan",
    "find_last_checkpoint",
    "log_figure",
    "log_histogram",
    "log_image",
    "log_text",
    "plan_run",
    "read_lineage",
]
