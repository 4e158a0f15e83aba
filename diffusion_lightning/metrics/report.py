"""An evaluation's numbers and pictures: ``metrics.json``, the per-group table, grids, logger entries.

Samples are scored in groups: a class for class-conditioned models (table ``per_class.csv``), a
prompt for text-to-image models (``per_prompt.csv``). Names follow one layout, in files and loggers
alike (loggers add the ``evals/`` prefix): ``<metric>/scores/<key>=<g>/avg|min|max`` per group,
``<metric>/scores/avg|min|max`` over all samples, where ``<key>`` is ``digit`` for digit classes,
``class`` for other classes and ``prompt`` for prompts (``<g>`` is then the prompt's index in the
table); set-level numbers (``fid``, ``kid``, ``precision``, ``recall``, ``accuracy``, ...) sit at the top.
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
from diffusion_lightning.metrics.prompts import shorten
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
    """What :class:`~diffusion_lightning.metrics.evaluator.Evaluator.score` measured.

    Args:
        config: The evaluation's configuration, as a dict.
        values: Set-level numbers: ``fid``, ``kid``, ``precision``, ``recall``, ``accuracy``, ...
        summaries: Per-sample metric -> group (``str``) or ``"overall"`` -> ``avg``/``min``/``max``/``n``.
        per_sample: Per-sample scores, ``(N,)`` each.
        images: The scored images in ``[0, 1]``.
        labels: The group of each sample: its class (class models) or its prompt's index in
            ``prompts`` (text models).
        class_names: Names of the classes, indexed by class (class models).
        lpips_per_class: LPIPS diversity per group.
        confusion: The judge's confusion matrix (requested class x read class).
        num_worst: Samples in the worst-samples grid.
        feature_space: The extractor names of FID/KID (``fid``) and precision/recall (``manifold``).
        sampling: How the samples were generated.
        prompts: The prompts, one per group (text models); ``None`` for class models.
        targets: The class the judge should read in each sample (text models scored by the judge).
    """

    config: dict[str, Any]
    values: dict[str, float]
    summaries: dict[str, dict[str, dict[str, float]]]
    per_sample: dict[str, torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] | None = None
    lpips_per_class: dict[int, float] = field(default_factory=dict)
    confusion: torch.Tensor | None = None
    num_worst: int = 16
    feature_space: dict[str, str | None] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] | None = None
    targets: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        """``prompt`` when the groups are prompts, else ``class``."""
        return "prompt" if self.prompts is not None else "class"

    @property
    def class_key(self) -> str:
        """The group's name in metric names: ``prompt``, ``digit`` (digit classes) or ``class``."""
        if self.prompts is not None:
            return "prompt"
        names = self.class_names or [str(c) for c in sorted(set(self.labels.tolist()))]
        return "digit" if all(len(n) == 1 and n.isdigit() for n in names) else "class"

    @property
    def table_name(self) -> str:
        """``per_prompt`` or ``per_class``: the per-group table's file (``.csv``) and logger name."""
        return f"per_{self.kind}"

    def group_name(self, group: int) -> str:
        """The prompt or class name of a group."""
        if self.prompts is not None:
            return self.prompts[group]
        return self.class_names[group] if self.class_names else str(group)

    def target(self, index: int) -> int:
        """The class the judge should read in sample ``index``."""
        return int((self.targets if self.targets is not None else self.labels)[index])

    def metrics(self) -> dict[str, float]:
        """Every scalar, flat: set-level values, then ``<metric>/scores/...`` per group and overall."""
        flat = dict(self.values)
        key = self.class_key
        for metric, summary in self.summaries.items():
            for group, stats in summary.items():
                prefix = f"{metric}/scores" if group == "overall" else f"{metric}/scores/{key}={group}"
                flat.update({f"{prefix}/{s}": float(stats[s]) for s in _STATS})
        for c, value in self.lpips_per_class.items():
            flat[f"lpips_diversity/scores/{key}={c}/avg"] = value
        return flat

    def per_group(self) -> list[dict[str, Any]]:
        """One row per group: its class (and name) or prompt, sample count, metric averages, the realism range.

        Prompt rows start with ``prompt_id`` (the ``<g>`` of metric names), ``prompt`` and, when the
        judge scored them, ``class`` (the class it should read).
        """
        rows = []
        for c in sorted(set(self.labels.tolist())):
            row: dict[str, Any]
            if self.prompts is not None:
                row = {"prompt_id": c, "prompt": self.prompts[c]}
                if self.targets is not None:
                    row["class"] = int(self.targets[self.labels == c][0])
            else:
                row = {"class": c}
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

    def per_class(self) -> list[dict[str, Any]]:
        """:meth:`per_group` under its earlier name (a class model's groups are its classes)."""
        return self.per_group()

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
        lines = [f"#{i}"]
        if self.prompts is not None:
            lines[0] += f" {shorten(self.prompts[int(self.labels[i])], 20)!r}"
            if "predicted" in self.per_sample:
                lines.append(f"want {self.target(i)}")
        else:
            lines[0] += f" want {self.labels[i].item()}"
        scores = []
        if "predicted" in self.per_sample:
            lines[-1] += f" read {self.per_sample['predicted'][i].item()}"
            scores.append(f"p={self.per_sample['class_probability'][i].item():.2f}")
        if "realism" in self.per_sample:
            scores.append(f"real={self.per_sample['realism'][i].item():.2f}")
        return "\n".join(lines + ([" ".join(scores)] if scores else []))

    def worst_grid(self, ncol: int = 8) -> PIL.Image.Image | None:
        index = self.worst()
        if index.numel() == 0:
            return None
        return _annotated_tiles(
            self.images[index], [self._caption(i) for i in index.tolist()], min(ncol, index.numel())
        )

    def samples_grid(self, per_class: int = 10, max_rows: int = 16) -> PIL.Image.Image:
        """Up to ``per_class`` samples of each group, a row per group labelled with its class or shortened prompt.

        At most ``max_rows`` groups (the first ones) are shown.
        """
        groups = sorted(set(self.labels.tolist()))[:max_rows]
        rows = [self.images[self.labels == c][:per_class] for c in groups]
        width = max(r.shape[0] for r in rows)
        blank = torch.ones_like(self.images[:1])
        tiles = torch.cat([torch.cat([r, blank.expand(width - r.shape[0], -1, -1, -1)]) for r in rows])
        names = [shorten(self.group_name(c), 32) for c in groups]
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
            entry: dict[str, Any] = {"index": i}
            if self.prompts is not None:
                entry["prompt"] = self.prompts[int(self.labels[i])]
                if self.targets is not None:
                    entry["class"] = self.target(i)
            else:
                entry["class"] = self.labels[i].item()
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
            self.table_name: self.per_group(),
            "confusion": self.confusion.tolist() if self.confusion is not None else None,
            "worst": worst,
        }

    def group_csv(self) -> str:
        """:meth:`per_group` as CSV."""
        rows = self.per_group()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def write(self, out_dir: str | os.PathLike[str], **info: Any) -> Path:
        """Write the evaluation's files to ``out_dir``; returns it.

        ``metrics.json``, ``per_class.csv`` (class models) or ``per_prompt.csv`` (text models),
        ``worst.png``, ``samples.png`` and, when the judge scored the samples, ``confusion.png``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", self.to_dict(**info))
        atomic_write_text(out / f"{self.table_name}.csv", self.group_csv())
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
        """Scalars (unless ``scalars=False``), the per-group table and the grids to a Trainer's or a list of loggers."""
        from lightning.pytorch import Trainer

        loggers = (
            (target.loggers if target.is_global_zero else []) if isinstance(target, Trainer) else list(target or [])
        )
        step = target.global_step if step is None and isinstance(target, Trainer) else (step or 0)
        if scalars:
            values = {f"{prefix}/{name}": value for name, value in self.metrics().items()}
            for logger in loggers:
                logger.log_metrics(values, step=step)
        log_text(loggers, f"{prefix}/{self.table_name}", self.group_csv(), step=step)
        worst = self.worst_grid()
        if worst is not None:
            log_image(loggers, f"{prefix}/worst", worst, step=step)
        log_image(loggers, f"{prefix}/samples", self.samples_grid(), step=step)
