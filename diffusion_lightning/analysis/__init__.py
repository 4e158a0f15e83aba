"""Compare students with their teacher: prediction MSE, trajectories, denoising strips, cost and quality.

Typical use (notebooks, benchmarks)::

    from diffusion_lightning import analysis

    session = analysis.Session.from_paths("teacher/", ["small/", "tiny/"], steps=25, seed=0)
    table, figure = analysis.mse_heatmap(session, timesteps=20)
    analysis.write_analysis("out", table, figure)

The command ``diffusion-lightning analyze`` (:mod:`diffusion_lightning.commands.analyze`) wraps these.
"""

from __future__ import annotations

from diffusion_lightning.analysis.compare import (
    denoising_strips,
    mse_heatmap,
    predict,
    training_timesteps,
    trajectory_comparison,
)
from diffusion_lightning.analysis.models import (
    CONDITIONING_FIELDS,
    Model,
    Session,
    check_conditioning,
    load_model,
    load_models,
)
from diffusion_lightning.analysis.tables import Table, figure_to_pil, write_analysis
from diffusion_lightning.analysis.timing import count_macs, make_evaluator, time_table

__all__ = [
    "CONDITIONING_FIELDS",
    "Model",
    "Session",
    "Table",
    "check_conditioning",
    "count_macs",
    "denoising_strips",
    "figure_to_pil",
    "load_model",
    "load_models",
    "make_evaluator",
    "mse_heatmap",
    "predict",
    "time_table",
    "trajectory_comparison",
    "training_timesteps",
    "write_analysis",
]
