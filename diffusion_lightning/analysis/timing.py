"""Cost and quality against size: latency, parameters, MACs and, with a judge, accuracy and domain FID."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from diffusion_lightning.analysis.models import Model, Session
from diffusion_lightning.analysis.tables import Table

__all__ = ["QUALITY_COLUMNS", "count_macs", "make_evaluator", "time_table"]

#: Columns that need a judge.
QUALITY_COLUMNS = ("accuracy", "fid")


@torch.no_grad()
def count_macs(model: Model) -> int:
    """Multiply-accumulates of one conditional forward at batch 1 (FLOPs / 2, counted by ``FlopCounterMode``)."""
    config = model.unet.config
    device = model.pipeline.device
    x = torch.zeros(1, config.in_channels, config.sample_size, config.sample_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model.unet(x.to(model.unet.dtype), t, class_labels=labels)
    return int(counter.get_total_flops() // 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _step_latency(model: Model, session: Session, repeats: int) -> tuple[float, int]:
    """Median seconds of one UNet forward at the sampling batch (2B with guidance) and that batch."""
    device = model.pipeline.device
    labels = session.labels.to(device)
    if session.guidance_scale not in (0.0, 1.0):
        labels = torch.cat([torch.full_like(labels, model.pipeline.num_classes), labels])
    x = session.noise.to(device=device, dtype=model.unet.dtype)
    x = torch.cat([x] * (len(labels) // len(x)))
    t = torch.full((len(labels),), int(model.pipeline.scheduler.config.num_train_timesteps) // 2, device=device)
    model.unet(x, t, class_labels=labels)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model.unet(x, t, class_labels=labels)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(labels)


def _image_latency(model: Model, session: Session) -> float:
    """Seconds per image of one full sampling call on the shared noise and labels."""
    device = model.pipeline.device
    _sync(device)
    start = time.perf_counter()
    model.pipeline(
        session.labels,
        num_inference_steps=session.steps,
        guidance_scale=session.guidance_scale,
        output_type="pt",
        latents=session.noise.to(device),
    )
    _sync(device)
    return (time.perf_counter() - start) / len(session.labels)


def make_evaluator(
    session: Session,
    judge: str,
    datamodule: Any = None,
    n_samples: int = 500,
    cache_dir: str | None = None,
    batch_size: int = 50,
) -> Any:
    """An :class:`~diffusion_lightning.metrics.Evaluator` for judge accuracy and domain FID, sampling as ``session``."""
    from diffusion_lightning.metrics.evaluator import EvaluationConfig, Evaluator

    config = EvaluationConfig(
        n_samples=n_samples,
        num_inference_steps=session.steps,
        guidance_scale=session.guidance_scale,
        seed=session.seed,
        batch_size=batch_size,
        metrics=["judge", "fid"],
        feature_extractor="digits",
        judge=judge,
        cache_dir=cache_dir,
        progress=session.progress,
    )
    return Evaluator(config, datamodule)


def time_table(session: Session, evaluator: Any = None, repeats: int = 5) -> tuple[Table, Figure]:
    """Latency per step and per image, parameters, MACs and (with ``evaluator``) accuracy and FID per model.

    Args:
        session: The models and sampling settings.
        evaluator: From :func:`make_evaluator`; ``None`` skips the quality columns.
        repeats: UNet forwards whose median is the latency per step.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not accepted; expected an int >= 1.")
    teacher = session.teacher
    rows = []
    for model in tqdm(session.models, desc="time: models", disable=not session.progress):
        step, batch = _step_latency(model, session, repeats)
        row: dict[str, Any] = {
            "model": model.name,
            "role": "teacher" if model is teacher else "student",
            "params": model.params,
            "size_factor": model.params / teacher.params,
            "macs": count_macs(model),
            "unet_batch": batch,
            "latency_per_step_ms": 1000 * step,
            "latency_per_image_ms": 1000 * _image_latency(model, session),
        }
        if evaluator is not None:
            metrics = evaluator.evaluate(model.pipeline, session.steps, session.guidance_scale).metrics()
            row.update({name: float(metrics[name]) for name in QUALITY_COLUMNS if name in metrics})
        rows.append(row)
    columns = ["model", "role", "params", "size_factor", "macs", "unet_batch"]
    columns += ["latency_per_step_ms", "latency_per_image_ms"]
    if evaluator is not None:
        columns += list(QUALITY_COLUMNS)
    meta = {
        "device": str(teacher.pipeline.device),
        "steps": session.steps,
        "guidance_scale": session.guidance_scale,
        "repeats": repeats,
        "quality": "judge accuracy and domain FID (judge features)" if evaluator is not None else "skipped: no judge",
    }
    return Table("time", columns, rows, meta), _figure(rows, evaluator is not None)


def _figure(rows: list[dict[str, Any]], quality: bool) -> Figure:
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    params = [r["params"] for r in rows]
    if quality:
        left.plot(params, [r.get("accuracy") for r in rows], "o", color="C0", label="accuracy")
        left.set_ylabel("judge accuracy", color="C0")
        twin = left.twinx()
        twin.plot(params, [r.get("fid") for r in rows], "s", color="C3", label="FID")
        twin.set_ylabel("domain FID", color="C3")
    else:
        left.text(0.5, 0.5, "quality skipped:\nno --judge given", ha="center", va="center", transform=left.transAxes)
        left.axis("off")
    left.set(xscale="log", xlabel="parameters", title="quality vs parameters")
    right.plot(params, [r["latency_per_step_ms"] for r in rows], "o", label="per step (UNet forward)")
    right.plot(params, [r["latency_per_image_ms"] for r in rows], "s", label="per image (full sampling / batch)")
    right.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms", title="latency vs parameters")
    for row in rows:
        right.annotate(row["model"], (row["params"], row["latency_per_step_ms"]), fontsize=7)
        if quality and row.get("accuracy") is not None:
            left.annotate(row["model"], (row["params"], row["accuracy"]), fontsize=7)
    right.legend(fontsize=8)
    return figure
