"""What a run is made of (components, sizes, noise schedule, CLI config) and how it went.

:class:`~diffusion_lightning.callbacks.RunSummary` logs the description when training starts,
stores it in ``metrics.json`` and draws the callbacks' per-epoch records with :func:`summary_figure`
when fitting ends; :class:`~diffusion_lightning.callbacks.GenerationMonitor` measures generation
with :class:`LatentRecorder` and :func:`peak_memory_mb`.

Lightning's ``ModelSummary`` prints layer tables to the console only; here the per-component
counts reach the loggers as scalars and hyperparameters (so runs can be compared by size) and as a
text table, next to the noise scheduler's diffusers config and the resolved ``config.yaml`` that
LightningCLI saved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch.nn.parameter import UninitializedParameter
from torchmetrics import Metric

from diffusion_lightning.loggers.media import log_text

__all__ = [
    "LatentRecorder",
    "describe_components",
    "describe_noise_scheduler",
    "describe_run",
    "log_run_description",
    "parameter_table",
    "peak_memory_mb",
    "summary_figure",
]


def _count(parameters: Any) -> tuple[int, int]:
    total = trainable = 0
    for param in parameters:
        if isinstance(param, UninitializedParameter):
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def describe_components(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Class and parameter counts of each direct child network of ``module``, plus ``total``.

    Metrics (torchmetrics) are not components. ``total`` counts shared parameters once.
    """
    components: dict[str, dict[str, Any]] = {}
    for name, child in module.named_children():
        if isinstance(child, Metric):
            continue
        total, trainable = _count(child.parameters())
        components[name] = {"class": type(child).__name__, "params_total": total, "params_trainable": trainable}
    total, trainable = _count(module.parameters())
    components["total"] = {"class": type(module).__name__, "params_total": total, "params_trainable": trainable}
    return components


def parameter_table(components: dict[str, dict[str, Any]]) -> str:
    """The output of :func:`describe_components` as an aligned plain-text table."""
    rows = [("component", "class", "params_total", "params_trainable")]
    rows += [
        (name, info["class"], f"{info['params_total']:,}", f"{info['params_trainable']:,}")
        for name, info in components.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def describe_noise_scheduler(module: Any) -> dict[str, Any] | None:
    """The public diffusers config of ``module.noise_scheduler`` with its ``class``; ``None`` if it has none."""
    scheduler = getattr(module, "noise_scheduler", None)
    config = getattr(scheduler, "config", None)
    if config is None:
        return None
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, **_jsonable(public)}


def describe_run(
    trainer: pl.Trainer, pl_module: pl.LightningModule, log_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """``{"components": ..., "noise_scheduler": ..., "cli_config": path or None}`` of a run.

    ``cli_config`` is the ``config.yaml`` LightningCLI saves in ``trainer.log_dir``, when it exists.
    Reading ``trainer.log_dir`` is a broadcast under a distributed strategy, so every process must
    call this together; code that runs on rank 0 alone passes a ``log_dir`` read earlier instead.
    """
    log_dir = trainer.log_dir if log_dir is None else log_dir
    cli_config = Path(log_dir) / "config.yaml" if log_dir else None
    return {
        "components": describe_components(pl_module),
        "noise_scheduler": describe_noise_scheduler(pl_module),
        "cli_config": str(cli_config) if cli_config is not None and cli_config.is_file() else None,
    }


def log_run_description(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """Log :func:`describe_run` to every logger (rank 0 only) and return it.

    Logged: scalars ``config/net/<component>/params_total`` and ``.../params_trainable``, the same
    counts and the scheduler config (``noise_scheduler/<key>``) as hyperparameters (beside the
    module's and data module's, which are repeated), and texts
    ``config/components`` (a table), ``config/noise_scheduler`` (JSON) and ``config/cli`` (the
    saved ``config.yaml``).
    """
    description = describe_run(trainer, pl_module)
    components, scheduler = description["components"], description["noise_scheduler"]
    if not trainer.is_global_zero:
        return description

    counts = {
        f"config/net/{name}/{key}": info[key]
        for name, info in components.items()
        for key in ("params_total", "params_trainable")
    }
    # A second hyperparameter record replaces the first in TensorBoard's HParams view, so it repeats
    # what Lightning logged at fit start (data module and module hyperparameters) before adding to it.
    hparams: dict[str, Any] = {}
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        hparams.update(datamodule.hparams_initial)
    hparams.update(pl_module.hparams_initial)
    hparams.update(counts)
    if scheduler is not None:
        hparams.update({f"noise_scheduler/{k}": v for k, v in scheduler.items()})
    for logger in trainer.loggers:
        logger.log_metrics({k: float(v) for k, v in counts.items()}, step=trainer.global_step)
        logger.log_hyperparams(hparams)

    log_text(trainer, "config/components", parameter_table(components))
    if scheduler is not None:
        log_text(trainer, "config/noise_scheduler", json.dumps(scheduler, indent=2))
    if description["cli_config"] is not None:
        log_text(trainer, "config/cli", Path(description["cli_config"]).read_text())
    return description


class LatentRecorder:
    """A pipeline ``callback_on_step_end`` that keeps the last latents and a few for a trajectory.

    Args:
        num_frames: Latents to keep in :attr:`frames`, after evenly spaced steps (the last one
            included) of the scheduler's ``timesteps``; 0 keeps none.
        rows: How many samples of the batch each kept frame holds.
    """

    def __init__(self, num_frames: int, rows: int) -> None:
        self.num_frames = num_frames
        self.rows = rows
        self.final: torch.Tensor | None = None
        """The latents after the last step (the samples before the pipeline clamps them)."""
        self.frames: list[torch.Tensor] = []
        """``(rows, C, H, W)`` CPU copies of the latents after each kept step."""
        self._keep: set[int] | None = None

    def __call__(self, pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        if self._keep is None:
            last, n = len(pipeline.scheduler.timesteps) - 1, self.num_frames
            self._keep = {round(i * last / max(n - 1, 1)) for i in range(n)} if n > 0 else set()
        self.final = tensors["latents"]
        if step in self._keep:
            self.frames.append(self.final[: self.rows].detach().float().cpu())
        return tensors


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA ``max_memory_allocated`` on a GPU; elsewhere the process's peak RSS (``None`` without ``resource``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _no_data(axes: Any) -> None:
    axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="gray")


def summary_figure(history: list[dict[str, Any]], bucket_edges: list[tuple[int, int]]) -> Figure:
    """Four panels of a run's per-epoch diffusion metrics, on an Agg canvas (no pyplot state).

    Loss per timestep bucket (training, one line per epoch from light to dark, and the last
    validation dashed), generation time per image, peak memory and the latent statistics over
    epochs. ``history`` is :meth:`RunSummary.history`'s per-epoch records; missing values are skipped.
    """
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, time_ax, memory_ax, latent_ax = figure.subplots(2, 2).flat
    centers = [(lo + hi) / 2 for lo, hi in bucket_edges]

    def curve(means: list[float | None]) -> tuple[list[float], list[float]]:
        pairs = [(c, m) for c, m in zip(centers, means) if m is not None]
        return [c for c, _ in pairs], [m for _, m in pairs]

    train = [(r["epoch"], r["train_loss_per_bucket"]) for r in history if r.get("train_loss_per_bucket")]
    colours = matplotlib.colormaps["viridis"]
    for i, (epoch, means) in enumerate(train):
        last = i == len(train) - 1
        label = f"train, epoch {epoch}" if i == 0 or last else None
        loss_ax.plot(*curve(means), color=colours(i / max(len(train) - 1, 1)), alpha=1.0 if last else 0.5, label=label)
    val = [(r["epoch"], r["val_loss_per_bucket"]) for r in history if r.get("val_loss_per_bucket")]
    if val:
        loss_ax.plot(*curve(val[-1][1]), "k--", marker="o", markersize=3, label=f"val, epoch {val[-1][0]}")
    if train or val:
        values = [m for _, means in train + val for m in means if m is not None]
        if values and min(values) > 0 and max(values) > 10 * min(values):
            loss_ax.set_yscale("log")
        loss_ax.legend(fontsize="small")
    else:
        _no_data(loss_ax)
    loss_ax.set(title="loss per timestep bucket", xlabel="timestep t", ylabel="mean loss")

    def series(axes: Any, key: str, label: str | None = None, **style: Any) -> bool:
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, **style)
        return bool(points)

    if not series(time_ax, "seconds_per_image"):
        _no_data(time_ax)
    time_ax.set(title="generation time", xlabel="epoch", ylabel="seconds per image")
    if not series(memory_ax, "peak_memory_mb", color="tab:red"):
        _no_data(memory_ax)
    memory_ax.set(title="peak memory while generating", xlabel="epoch", ylabel="MiB")
    drawn = [series(latent_ax, f"latent_{key}", label=key) for key in ("mean", "std", "min", "max")]
    if any(drawn):
        latent_ax.legend(fontsize="small")
    else:
        _no_data(latent_ax)
    latent_ax.set(title="final samples before clamping", xlabel="epoch", ylabel="value")
    return figure
