"""How far students are from their teacher: prediction MSE per timestep, DDIM trajectories, denoising strips."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from diffusion_lightning.analysis.models import Model, Session
from diffusion_lightning.analysis.tables import Table

__all__ = ["denoising_strips", "mse_heatmap", "predict", "trajectory_comparison", "training_timesteps"]


def _size_label(model: Model, teacher: Model) -> str:
    return f"{model.name} (x{model.params / teacher.params:.2f})"


def training_timesteps(model: Model, k: int) -> list[int]:
    """``k`` evenly spaced training timesteps from 0 to ``num_train_timesteps - 1``, ascending."""
    total = int(model.pipeline.scheduler.config.num_train_timesteps)
    if not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"timesteps={k!r} is not accepted; expected an int in 1..{total} (the training timesteps).")
    return sorted({int(t) for t in np.linspace(0, total - 1, k).round()})


@torch.no_grad()
def predict(model: Model, x_t: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
    """The conditional network output (noise, sample or velocity: the scheduler's prediction type) on CPU."""
    device = model.pipeline.device
    timestep = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=device)
    x = x_t.to(device=device, dtype=model.unet.dtype)
    return model.unet(x, timestep, class_labels=labels.to(device)).sample.float().cpu()


def mse_heatmap(session: Session, timesteps: int = 20) -> tuple[Table, Figure]:
    """Prediction MSE of each student against the teacher at ``timesteps`` training timesteps.

    ``x_0`` is the teacher's DDIM samples from the shared noise (:meth:`Session.teacher_samples`),
    ``x_t = scheduler.add_noise(x_0, eps, t)`` with the session's ``eps``; every network predicts
    conditional on the class (no guidance), and the MSE averages over samples and pixels.

    Returns:
        The table (a row per student, sorted by size, a column per timestep) and the heatmap, whose
        image holds exactly ``table.meta["matrix"]``.
    """
    teacher = session.teacher
    steps = training_timesteps(teacher, timesteps)
    x0 = session.teacher_samples()
    scheduler = teacher.pipeline.scheduler
    students = sorted(session.students, key=lambda m: m.params)
    matrix = np.zeros((len(students), len(steps)))
    for j, t in enumerate(tqdm(steps, desc="mse: timesteps", disable=not session.progress)):
        x_t = scheduler.add_noise(x0, session.eps, torch.full((x0.shape[0],), t, dtype=torch.long))
        reference = predict(teacher, x_t, t, session.labels)
        for i, student in enumerate(students):
            matrix[i, j] = F.mse_loss(predict(student, x_t, t, session.labels), reference).item()
    columns = ["student", "params", "size_factor", *[str(t) for t in steps]]
    rows = [
        {
            "student": s.name,
            "params": s.params,
            "size_factor": s.params / teacher.params,
            **{str(t): float(v) for t, v in zip(steps, matrix[i])},
        }
        for i, s in enumerate(students)
    ]
    meta = {
        "timesteps": steps,
        "matrix": matrix.tolist(),
        "prediction_type": teacher.conditioning()["prediction_type"],
        "x0": f"teacher DDIM samples ({session.steps} steps, guidance {session.guidance_scale})",
        "seed": session.seed,
        "classes": list(session.classes),
        "n_per_class": session.n_per_class,
    }
    return Table("mse", columns, rows, meta), _heatmap(matrix, [_size_label(s, teacher) for s in students], steps)


def _heatmap(matrix: np.ndarray, names: list[str], steps: list[int]) -> Figure:
    figure = Figure(figsize=(max(5.0, 0.45 * len(steps) + 3), max(2.5, 0.45 * len(names) + 1.5)), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    stride = max(1, len(steps) // 12)
    ax.set_xticks(range(0, len(steps), stride), [str(t) for t in steps[::stride]])
    ax.set_xlabel("training timestep t")
    ax.set_ylabel("student (size factor vs teacher)")
    ax.set_title("prediction MSE vs teacher")
    if matrix.size <= 240:
        middle = (np.nanmax(matrix) + np.nanmin(matrix)) / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            color = "black" if value > middle else "white"
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7, color=color)
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label("MSE of the conditional prediction vs the teacher's")
    return figure


def trajectory_comparison(session: Session) -> tuple[Table, Figure]:
    """Per-step MSE and cosine similarity of each student's DDIM trajectory to the teacher's.

    Every model starts from the shared noise and labels; ``x_t`` is recorded after each step. The
    cosine is per sample (flattened) and averaged over the batch. ``timestep`` is the timestep the
    step started from (``x_t`` after step ``i`` sits at the next one, or 0 after the last).
    """
    reference = session.trajectory(session.teacher)
    rows: list[dict[str, Any]] = []
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for student in tqdm(session.students, desc="trajectory: students", disable=not session.progress):
        latents = session.trajectory(student)["latents"]
        mse, cosine = [], []
        for i, (ours, theirs) in enumerate(zip(latents, reference["latents"])):
            mse.append(F.mse_loss(ours, theirs).item())
            cosine.append(F.cosine_similarity(ours.flatten(1), theirs.flatten(1), dim=1).mean().item())
            rows.append(
                {
                    "student": student.name,
                    "step": i + 1,
                    "timestep": reference["timesteps"][i],
                    "mse": mse[-1],
                    "cosine": cosine[-1],
                }
            )
        curves[student.name] = (mse, cosine)
    meta = {
        "final": {name: {"mse": m[-1], "cosine": c[-1]} for name, (m, c) in curves.items()},
        "steps": session.steps,
        "guidance_scale": session.guidance_scale,
        "seed": session.seed,
    }
    table = Table("trajectory", ["student", "step", "timestep", "mse", "cosine"], rows, meta)
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for name, (mse, cosine) in curves.items():
        steps = range(1, len(mse) + 1)
        axes[0].plot(steps, mse, marker=".", label=name)
        axes[1].plot(steps, cosine, marker=".", label=name)
    axes[0].set(title="MSE of x_t vs teacher", xlabel="DDIM step", ylabel="MSE")
    axes[1].set(title="cosine similarity of x_t to teacher", xlabel="DDIM step", ylabel="cosine")
    axes[1].legend(fontsize=8)
    return table, figure


def _to_image(x: torch.Tensor) -> tuple[np.ndarray, str | None]:
    array = (x.float() / 2 + 0.5).clamp(0, 1).numpy()
    if array.shape[0] == 3:
        return array.transpose(1, 2, 0), None
    return array[0], "gray"


def denoising_strips(session: Session, columns: int = 5, sample: int = 0) -> tuple[Table, Figure]:
    """``x_t`` and the predicted ``x_0`` of one sample at ``columns`` steps, for the teacher and each student.

    Rows of the figure: per model an ``x_t`` row and an ``x0-pred`` row; columns: DDIM steps (the
    last one included). The table gives, per model and shown step, the MSE of its predicted ``x_0``
    against the teacher's.
    """
    if not 0 <= sample < len(session.labels):
        raise ValueError(f"sample={sample!r} is not accepted; expected 0..{len(session.labels) - 1}.")
    if columns < 1:
        raise ValueError(f"columns={columns!r} must be >= 1.")
    shown = sorted({int(i) for i in np.linspace(0, session.steps - 1, min(columns, session.steps)).round()})
    models = session.models
    reference = session.trajectory(session.teacher)
    figure = Figure(figsize=(1.3 * len(shown) + 1.5, 1.3 * 2 * len(models) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.asarray(figure.subplots(2 * len(models), len(shown), squeeze=False))
    rows = []
    for m, model in enumerate(tqdm(models, desc="denoising: models", disable=not session.progress)):
        trajectory = session.trajectory(model)
        for c, step in enumerate(shown):
            for r, key in enumerate(("latents", "x0")):
                image, cmap = _to_image(trajectory[key][step, sample])
                ax = axes[2 * m + r, c]
                ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{model.name}\n{'x_t' if key == 'latents' else 'x0-pred'}", fontsize=8)
                if m == 0 and r == 0:
                    ax.set_title(f"step {step + 1} (t={trajectory['timesteps'][step]})", fontsize=8)
            x0_mse = F.mse_loss(trajectory["x0"][step, sample], reference["x0"][step, sample]).item()
            rows.append(
                {
                    "model": model.name,
                    "step": step + 1,
                    "timestep": trajectory["timesteps"][step],
                    "x0_mse_vs_teacher": x0_mse,
                }
            )
    figure.suptitle(f"denoising of sample {sample} (class {int(session.labels[sample])})", fontsize=9)
    meta = {"sample": sample, "class": int(session.labels[sample]), "steps_shown": [s + 1 for s in shown]}
    return Table("denoising", ["model", "step", "timestep", "x0_mse_vs_teacher"], rows, meta), figure
