"""What a run left behind about a checkpoint: its step, the run summary, the CLI config, the last evaluation.

:func:`read_run` collects it as a :class:`RunRecord`, which the model card of an exported folder
describes (see :mod:`diffusion_lightning.utils.model_card`). Missing or unreadable files leave their
fields unknown: a card is written from whatever is there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunRecord", "headline_metrics", "read_run"]


@dataclass
class RunRecord:
    """What a run left about the checkpoint exported, for the card (any field may be unknown)."""

    checkpoint: str | None = None
    """The checkpoint file."""
    global_step: int | None = None
    """Optimizer steps of the checkpoint."""
    epoch: int | None = None
    """Epoch of the checkpoint."""
    run_steps: int | None = None
    """Steps of the whole run (its summary)."""
    run_epochs: int | None = None
    """Epochs of the whole run."""
    wall_time_s: float | None = None
    """Wall time of the (last) fit."""
    status: str | None = None
    """How the run ended: ``finished``, ``interrupted`` or ``failed``."""
    data: str | None = None
    """The data module's class path (LightningCLI ``config.yaml``)."""
    data_args: dict[str, Any] = field(default_factory=dict)
    """The data module's init arguments."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """Trainer settings of note (``max_steps``, ``max_epochs``, ``precision``...)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final training and validation metrics."""
    evaluation: dict[str, float] = field(default_factory=dict)
    """Metrics of the run's latest ``evaluate`` (``eval/metrics.json`` beside the checkpoints)."""
    sample_grid: Path | None = None
    """The run's newest sample (or reconstruction) grid, copied as the card's image."""

    @property
    def dataset(self) -> str:
        """A short name of the training data: its data module's class name."""
        return self.data.rsplit(".", 1)[-1] if self.data else "unknown"


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The set-level values of an evaluation and each score's overall mean (not the per-class or per-prompt ones)."""
    return {k: v for k, v in _finite(metrics).items() if "/" not in k or (k.count("/") == 2 and k.endswith("/avg"))}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(ckpt: str | Path) -> RunRecord:
    """What the checkpoint ``ckpt`` and its run folder (the parent of ``checkpoints/``) say about the training.

    Reads the checkpoint's step and epoch, the run summary ``metrics.json`` that
    :class:`~diffusion_lightning.callbacks.RunSummary` writes, the LightningCLI ``config.yaml`` it
    names (else the newest under ``lightning_logs/``), the run's last evaluation
    (``eval/metrics.json``) and its newest sample grid (``samples/*.png``, else a VAE run's
    ``reconstructions/*.png``). Missing or unreadable files leave their fields unknown.
    """
    from diffusion_lightning.modules.loading import read_checkpoint

    path = Path(ckpt)
    root = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    record = RunRecord(checkpoint=str(path))
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except (OSError, ValueError, RuntimeError):
        checkpoint = {}
    record.global_step = checkpoint.get("global_step")
    record.epoch = checkpoint.get("epoch")
    summary = _read_json(root / "metrics.json")
    if "global_step" in summary:  # a RunSummary, not some other metrics file
        record.run_steps, record.run_epochs = summary.get("global_step"), summary.get("epochs")
        record.wall_time_s, record.status = summary.get("wall_time_s"), summary.get("status")
        record.metrics = _finite(summary.get("metrics") or {})
    configs = [Path(summary["cli_config"])] if isinstance(summary.get("cli_config"), str) else []
    configs += sorted(root.glob("lightning_logs/version_*/config.yaml"), key=lambda p: p.stat().st_mtime)[::-1]
    configs.append(root / "config.yaml")
    config = next((c for c in configs if c.is_file()), None)
    if config is not None:
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            data = {}
        section = data.get("data") if isinstance(data.get("data"), dict) else {}
        record.data = section.get("class_path")
        record.data_args = section.get("init_args") or {}
        trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
        keys = ("max_steps", "max_epochs", "precision", "accumulate_grad_batches")
        record.trainer = {k: trainer[k] for k in keys if trainer.get(k) not in (None, -1)}
    record.evaluation = headline_metrics(_read_json(root / "eval" / "metrics.json").get("metrics") or {})
    for kind in ("samples", "reconstructions"):  # SampleGridLogger's grids, ReconstructionLogger's for a VAE
        grids = sorted((root / kind).glob("*.png"))
        if grids:
            record.sample_grid = grids[-1]
            break
    return record
