"""An evaluation's numbers and pictures: ``metrics.json``, ``per_class.csv``, grids, logger entries.

Names follow one layout, in files and loggers alike (loggers add the ``evals/`` prefix):
``<metric>/scores/<key>=<c>/avg|min|max`` per class, ``<metric>/scores/avg|min|max`` over all
samples, where ``<key>`` is ``digit`` for digit classes and ``class`` otherwise; set-level
numbers (``fid``, ``kid``, ``precision``, ``recall``, ``accuracy``, ...) sit at the top.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from diffusion_lightning.loggers.media import Target, log_image, log_text
from diffusion_lightning.utils.images import label_grid, make_grid
from diffusion_lightning.utils.io import atomic_write_text, save_image, write_json

__all__ = ["EvaluationResult"]

_STATS = ("avg", "min", "max")


def _annotated_tiles(images: torch.Tensor, captions: list[str], ncol: int, scale: int = 3) -> PIL.Image.Image:
    """Images upscaled ``scale`` times, each with its caption underneath, ``ncol`` per row."""
    font = PIL.ImageFont.load_default()
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    text_h = 14 * max((c.count("\n") + 1 for c in captions), default=1)
    tile_w = max(w, 8 + max((int(font.getlength(line)) for c in captions for line in c.split("\n")), default=0))
    rows = (len(captions) + ncol - 1) // ncol
    canvas = PIL.Image.new("RGB", (ncol * (tile_w + 4) + 4, rows * (h + text_h + 6) + 4), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = 4 + (i % ncol) * (tile_w + 4), 4 + (i // ncol) * (h + text_h + 6)
        array = image.float().clamp(0, 1).mul(255).round().byte()
        tile = PIL.Image.fromarray(array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy())
        canvas.paste(tile.convert("RGB").resize((w, h), PIL.Image.NEAREST), (x + (tile_w - w) // 2, y))
        draw.multiline_text((x + 2, y + h + 2), caption, fill="black", font=font, spacing=2)
    return canvas


@dataclass
class EvaluationResult:
    """What :class:`~diffusion_lightning.metrics.evaluator.Evaluator.score` measured."""

    config: dict[str, Any]
    values: dict[str, float]  # set-level numbers: fid, kid, precision, recall, accuracy, ...
    summaries: dict[str, dict[str, dict[str, float]]]  # per-sample metric -> class or "overall" -> avg/min/max/n
    per_sample: dict[str, torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] | None = None
    lpips_per_class: dict[int, float] = field(default_factory=dict)
    confusion: torch.Tensor | None = None
    num_worst: int = 16
    feature_space: dict[str, str | None] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def class_key(self) -> str:
        names = self.class_names or [str(c) for c in sorted(set(self.labels.tolist()))]
        return "digit" if all(len(n) == 1 and n.isdigit() for n in names) else "class"

    def metrics(self) -> dict[str, float]:
        """Every scalar, flat: set-level values, then ``<metric>/scores/...`` per class and overall."""
        flat = dict(self.values)
        key = self.class_key
        for metric, summary in self.summaries.items():
            for group, stats in summary.items():
                prefix = f"{metric}/scores" if group == "overall" else f"{metric}/scores/{key}={group}"
                flat.update({f"{prefix}/{s}": float(stats[s]) for s in _STATS})
        for c, value in self.lpips_per_class.items():
            flat[f"lpips_diversity/scores/{key}={c}/avg"] = value
        return flat

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: sample count, then each metric's average (and the realism range)."""
        rows = []
        for c in sorted(set(self.labels.tolist())):
            row: dict[str, Any] = {"class": c}
            if self.class_names:
                row["name"] = self.class_names[c]
            row["n"] = int((self.labels == c).sum())
            for metric, summary in self.summaries.items():
                stats = summary.get(str(c))
                if stats is not None:
                    row[metric] = round(stats["avg"], 6)
                    if metric == "realism":
                        row.update(realism_min=round(stats["min"], 6), realism_max=round(stats["max"], 6))
            if "in_real_manifold" in self.per_sample:
                row["precision"] = round(self.per_sample["in_real_manifold"][self.labels == c].mean().item(), 6)
            if c in self.lpips_per_class:
                row["lpips_diversity"] = round(self.lpips_per_class[c], 6)
            rows.append(row)
        return rows

    def worst(self) -> torch.Tensor:
        """Indices of the ``num_worst`` lowest-scored samples.

        Ranked by the judge's probability of the requested class, else by realism.
        """
        score = self.per_sample.get("class_probability", self.per_sample.get("realism"))
        if score is None:
            return torch.zeros(0, dtype=torch.long)
        order = torch.sort(score, stable=True).indices
        return order[: self.num_worst]

    def _caption(self, i: int) -> str:
        parts = [f"#{i} want {self.labels[i].item()}"]
        if "predicted" in self.per_sample:
            parts[0] += f" read {self.per_sample['predicted'][i].item()}"
            parts.append(f"p={self.per_sample['class_probability'][i].item():.2f}")
        if "realism" in self.per_sample:
            parts.append(f"real={self.per_sample['realism'][i].item():.2f}")
        return parts[0] + ("\n" + " ".join(parts[1:]) if len(parts) > 1 else "")

    def worst_grid(self, ncol: int = 8) -> PIL.Image.Image | None:
        index = self.worst()
        if index.numel() == 0:
            return None
        return _annotated_tiles(
            self.images[index], [self._caption(i) for i in index.tolist()], min(ncol, index.numel())
        )

    def samples_grid(self, per_class: int = 10) -> PIL.Image.Image:
        """Up to ``per_class`` samples of each class, one labelled row per class."""
        classes = sorted(set(self.labels.tolist()))
        rows = [self.images[self.labels == c][:per_class] for c in classes]
        width = max(r.shape[0] for r in rows)
        blank = torch.ones_like(self.images[:1])
        tiles = torch.cat([torch.cat([r, blank.expand(width - r.shape[0], -1, -1, -1)]) for r in rows])
        names = [self.class_names[c] if self.class_names else str(c) for c in classes]
        return label_grid(make_grid(tiles, nrow=width), names, scale=2)

    def confusion_figure(self) -> Any:
        """The judge's row-normalised confusion matrix as a matplotlib ``Figure`` (no pyplot state touched)."""
        from matplotlib.figure import Figure

        assert self.confusion is not None
        counts = self.confusion.float()
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        figure = Figure(figsize=(5.5, 4.5))
        axis = figure.subplots()
        shown = axis.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
        for (r, c), value in zip(
            torch.cartesian_prod(torch.arange(share.shape[0]), torch.arange(share.shape[1])).tolist(),
            share.flatten().tolist(),
        ):
            if counts[r, c] > 0:
                axis.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
        axis.set_xlabel("read by the judge")
        axis.set_ylabel("requested class")
        axis.set_xticks(range(share.shape[1]))
        axis.set_yticks(range(share.shape[0]))
        axis.set_title("judge confusion (row-normalised)")
        figure.colorbar(shown, ax=axis, fraction=0.046)
        figure.tight_layout()
        return figure

    def to_dict(self, **info: Any) -> dict[str, Any]:
        worst = []
        for i in self.worst().tolist():
            entry: dict[str, Any] = {"index": i, "class": self.labels[i].item()}
            for name in ("predicted", "class_probability", "realism"):
                if name in self.per_sample:
                    entry[name] = self.per_sample[name][i].item()
            worst.append(entry)
        return {
            **info,
            "config": self.config,
            "sampling": self.sampling,
            "feature_space": self.feature_space,
            "n_samples": int(self.labels.numel()),
            "metrics": self.metrics(),
            "per_class": self.per_class(),
            "confusion": self.confusion.tolist() if self.confusion is not None else None,
            "worst": worst,
        }

    def per_class_csv(self) -> str:
        rows = self.per_class()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def write(self, out_dir: str | os.PathLike[str], **info: Any) -> Path:
        """``metrics.json``, ``per_class.csv``, ``worst.png``, ``samples.png`` and ``confusion.png`` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", self.to_dict(**info))
        atomic_write_text(out / "per_class.csv", self.per_class_csv())
        worst = self.worst_grid()
        if worst is not None:
            save_image(worst, out / "worst.png")
        save_image(self.samples_grid(), out / "samples.png")
        if self.confusion is not None:
            figure = self.confusion_figure()
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100)
            save_image(PIL.Image.open(io.BytesIO(buffer.getvalue())), out / "confusion.png")
        return out

    def log(self, target: Target, step: int | None = None, prefix: str = "evals", scalars: bool = True) -> None:
        """Scalars (unless ``scalars=False``), the per-class table and the grids to a Trainer's or a list of loggers."""
        from lightning.pytorch import Trainer

        loggers = (
            (target.loggers if target.is_global_zero else []) if isinstance(target, Trainer) else list(target or [])
        )
        step = target.global_step if step is None and isinstance(target, Trainer) else (step or 0)
        if scalars:
            values = {f"{prefix}/{name}": value for name, value in self.metrics().items()}
            for logger in loggers:
                logger.log_metrics(values, step=step)
        log_text(loggers, f"{prefix}/per_class", self.per_class_csv(), step=step)
        worst = self.worst_grid()
        if worst is not None:
            log_image(loggers, f"{prefix}/worst", worst, step=step)
        log_image(loggers, f"{prefix}/samples", self.samples_grid(), step=step)
