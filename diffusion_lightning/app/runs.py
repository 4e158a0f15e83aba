"""The *Runs* tab: what the runs under the app's root recorded.

A run is a folder with a ``checkpoints/`` folder, a ``config.yaml``, a ``metrics.json`` (what
:class:`~diffusion_lightning.callbacks.RunSummary` and ``evaluate`` write), a ``summary.json`` or
TensorBoard event files (in ``lightning_logs/version_N`` or elsewhere below it). The tab shows its
config, its curves (the scalars of its event files, read with TensorBoard's ``EventAccumulator``),
its images (PNGs in the run folder and the images of its event files: sample grids over training,
attention maps) and its metrics as a table.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

from diffusion_lightning.app.paths import relative, under_root

#: Files or folders that make a folder a run.
RUN_MARKERS = ("checkpoints", "config.yaml", "metrics.json", "summary.json", "lightning_logs")
#: Folders that belong to a run rather than being runs themselves.
INNER_FOLDERS = {"checkpoints", "lightning_logs", "latents", "samples", "__pycache__"}
#: Images shown per run, newest last.
MAX_IMAGES = 48


def _events(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def list_runs(root: str | os.PathLike[str]) -> list[str]:
    """The runs under ``root``, relative to it (``.`` when the root is one)."""
    base = Path(root).resolve()
    found = []
    if not base.is_dir():
        return found
    for folder, dirs, files in os.walk(base):
        names = set(dirs) | set(files)
        if any(marker in names for marker in RUN_MARKERS) and "model_index.json" not in files:
            found.append(relative(base, folder))
        elif any(name.startswith("events.out.tfevents.") for name in files):
            found.append(relative(base, folder))
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if d not in INNER_FOLDERS and not d.startswith("."))
    return sorted(found)


def read_config(run: Path) -> str:
    """The run's ``config.yaml`` (the newest logger version's when the run folder has none)."""
    candidates = [run / "config.yaml", *sorted(run.glob("lightning_logs/version_*/config.yaml"), key=_version)[::-1]]
    for path in candidates:
        if path.is_file():
            return f"# {path.name} ({relative(run, path)})\n" + path.read_text(errors="replace")
    return "# no config.yaml in this run"


def _version(path: Path) -> int:
    name = path.parent.name
    return int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else -1


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's event files: ``{tag: [(step, value), ...]}``, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for path in _events(run):
        events = EventAccumulator(os.fspath(path), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            for event in events.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(values.items()) for tag, values in sorted(scalars.items())}


def read_event_images(run: Path, limit: int = MAX_IMAGES) -> list[tuple[Any, str]]:
    """The images of the run's event files (the last one of each tag): ``(PIL image, "tag @ step")``."""
    import PIL.Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, tuple[int, bytes]] = {}
    for path in _events(run):
        events = EventAccumulator(os.fspath(path), size_guidance={"scalars": 1, "images": 1, "tensors": 1})
        events.Reload()
        for tag in events.Tags().get("images", []):
            last = events.Images(tag)[-1]
            found[tag] = (last.step, last.encoded_image_string)
    images = []
    for tag, (step, data) in sorted(found.items())[:limit]:
        try:
            images.append((PIL.Image.open(io.BytesIO(data)).convert("RGB"), f"{tag} @ step {step}"))
        except OSError:
            continue
    return images


def read_file_images(run: Path, limit: int = MAX_IMAGES) -> list[tuple[str, str]]:
    """The PNGs of the run folder (sample grids, attention maps, summary and evaluation figures)."""
    paths = sorted(path for path in run.rglob("*.png") if "latents" not in path.parts)
    return [(os.fspath(path), relative(run, path)) for path in paths[-limit:]]


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows = []
        for key, inner in value.items():
            rows += _flatten(inner, f"{prefix}{key}." if not isinstance(inner, dict) or inner else f"{prefix}{key}")
        return [(key.rstrip("."), inner) for key, inner in rows]
    if isinstance(value, list):
        return [(prefix, json.dumps(value)[:200])]
    return [(prefix, value)]


def read_metrics(run: Path) -> list[list[Any]]:
    """The run's ``metrics.json`` and ``summary.json`` files (its evaluations' too) as ``[file, key, value]`` rows."""
    rows: list[list[Any]] = []
    for path in sorted([*run.glob("metrics.json"), *run.glob("summary.json"), *run.glob("*/metrics.json")]):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key, value in _flatten(data):
            if isinstance(value, float) and math.isfinite(value):
                value = round(value, 6)
            rows.append([relative(run, path), key, value if isinstance(value, (int, float, str)) else str(value)])
    return rows


def plot_scalars(scalars: dict[str, list[tuple[int, float]]]) -> Any:
    """A matplotlib figure: losses in the first panel, every other scalar (evaluations, rates) in the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = {tag: values for tag, values in scalars.items() if "loss" in tag and len(values) > 1}
    others = {
        tag: values
        for tag, values in scalars.items()
        if tag not in losses and tag != "hp_metric" and not tag.startswith(("config/", "epoch", "lr-", "grad", "act/"))
    }
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for axis, group, title in ((axes[0], losses, "losses"), (axes[1], others, "evaluation and other scalars")):
        for tag, values in list(group.items())[:12]:
            steps, ys = zip(*values)
            axis.plot(steps, ys, label=tag, marker="." if len(values) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        if group:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "none logged", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    plt.close(figure)
    return figure


def describe_run(root: str | os.PathLike[str], run: str) -> dict[str, Any]:
    """Everything the tab shows of ``run`` (a folder under ``root``).

    Raises:
        SystemExit: ``error: ...`` for a folder outside the root, or one that is not a folder.
    """
    try:
        folder = under_root(root, run, "run")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    if not folder.is_dir():
        raise SystemExit(f"error: run {run!r} is not a folder under the root.")
    scalars = read_scalars(folder)
    return {
        "config": read_config(folder),
        "scalars": scalars,
        "images": [*read_file_images(folder), *read_event_images(folder)],
        "metrics": read_metrics(folder),
        "checkpoints": sorted(relative(folder, path) for path in folder.glob("checkpoints/*.ckpt")),
    }


# ---------------------------------------------------------------------- the tab


def build_tab(root: str | os.PathLike[str]) -> None:
    """The *Runs* tab's components and events (inside a ``gr.Blocks``)."""
    import gradio as gr

    def refresh() -> Any:
        return gr.update(choices=list_runs(root))

    def show(run: str) -> tuple[str, str, Any, Any, Any]:
        if not run:
            return "", "", None, None, None
        try:
            found = describe_run(root, run)
        except SystemExit as error:
            raise gr.Error(str(error)) from None
        summary = f"**{run}**: {len(found['scalars'])} scalar tags, {len(found['images'])} images"
        if found["checkpoints"]:
            summary += ", checkpoints: " + ", ".join(f"`{name}`" for name in found["checkpoints"])
        figure = plot_scalars(found["scalars"]) if found["scalars"] else None
        table = found["metrics"] or None
        return summary, found["config"], figure, found["images"] or None, table

    with gr.Row():
        run = gr.Dropdown(choices=list_runs(root), value=None, label="Run", elem_id="runs-run", scale=4)
        button = gr.Button("Refresh list", elem_id="runs-refresh", scale=1)
    summary = gr.Markdown("", elem_id="runs-summary")
    curves = gr.Plot(label="Curves", elem_id="runs-curves")
    images = gr.Gallery(label="Images: sample grids, attention maps, figures", format="png", columns=4,
                        elem_id="runs-images")  # fmt: skip
    metrics = gr.Dataframe(headers=["file", "key", "value"], label="Metrics and evaluations", elem_id="runs-metrics")
    config = gr.Code(label="Config", language="yaml", elem_id="runs-config")

    button.click(refresh, outputs=run)
    run.change(show, inputs=run, outputs=[summary, config, curves, images, metrics])
