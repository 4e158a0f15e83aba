"""``diffusion-lightning analyze``: compare students with their teacher (MSE, trajectories, denoising, time)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jsonargparse import Namespace

from diffusion_lightning.analysis import (
    Session,
    Table,
    denoising_strips,
    load_models,
    make_evaluator,
    mse_heatmap,
    time_table,
    trajectory_comparison,
    write_analysis,
)
from diffusion_lightning.commands.common import CommandParser, add_dataclass_flags
from diffusion_lightning.utils.device import resolve_device

#: What ``analyze`` can run (``all``: every one).
AnalysisName = Literal["mse", "trajectory", "denoising", "time", "all"]
ANALYSES: tuple[str, ...] = get_args(AnalysisName)[:-1]
#: Where ``analyze`` logs its figures.
LoggerName = Literal["tensorboard", "csv", "none"]
LOGGERS: tuple[str, ...] = get_args(LoggerName)

log = logging.getLogger(__name__)


@dataclass
class AnalyzeArguments:
    """What ``analyze`` compares, how, and where it writes.

    Args:
        analysis: What to run (all: the four).
        teacher: Teacher: a .ckpt file or a pipeline folder.
        students: Students: .ckpt files or pipeline folders.
        out: Output folder.
        labels: Student names (default: their folder or file names).
        classes: Classes to sample (default: all).
        n_per_class: Samples per class.
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance scale (default: the teacher's, 2.0 when unknown).
        seed: Seed of the shared noise.
        cpu: Run on the CPU even when a GPU is present.
        timesteps: mse: evenly spaced training timesteps.
        columns: denoising: steps shown per strip.
        repeats: time: UNet forwards per latency median.
        judge: time: DigitClassifier checkpoint for accuracy and FID (default: skipped).
        n_samples: time: samples per model for the judge.
        data: time: YAML with a data: section for FID's real images (default: embedded MNIST).
        cache_dir: time: cache of real-image features.
        batch_size: time: judge batch size.
        logger: Where the PNGs go (OUT/logs).
        progress: Show progress bars.
    """

    analysis: AnalysisName = field(metadata={"positional": True})
    teacher: str
    students: list[str]
    out: str
    labels: list[str] | None = None
    classes: list[int] | None = None
    n_per_class: int = 4
    steps: int = 50
    guidance_scale: float | None = None
    seed: int = 0
    cpu: bool = False
    timesteps: int = 20
    columns: int = 5
    repeats: int = 5
    judge: str | None = None
    n_samples: int = 500
    data: str | None = None
    cache_dir: str | None = None
    batch_size: int = 50
    logger: LoggerName = "tensorboard"
    progress: bool = True


def build_parser() -> CommandParser:
    """The ``analyze`` parser: the fields of :class:`AnalyzeArguments`."""
    parser = CommandParser(
        prog="diffusion-lightning analyze",
        description="Compare student networks with their teacher from the same noise and classes: prediction MSE "
        "per timestep (mse), DDIM trajectories (trajectory), x_t / predicted x_0 strips (denoising), and latency, "
        "parameters, MACs and optional judge quality (time). Writes OUT/<analysis>.csv, .json and .png.",
    )
    add_dataclass_flags(parser, AnalyzeArguments)
    return parser


def _scalars(table: Table) -> dict[str, float]:
    """A few numbers per analysis for scalar-only loggers."""
    if table.name == "mse":
        return {f"analysis/mse/{r['student']}": sum(table.meta["matrix"][i]) / len(table.meta["timesteps"])
                for i, r in enumerate(table.rows)}  # fmt: skip
    if table.name == "trajectory":
        final = table.meta["final"]
        return {f"analysis/trajectory/{k}/{name}": v[k] for name, v in final.items() for k in ("mse", "cosine")}
    if table.name == "time":
        return {f"analysis/time/{r['model']}/latency_per_step_ms": r["latency_per_step_ms"] for r in table.rows}
    return {}


def run(args: Namespace) -> dict[str, Table]:
    """Load the models, run the chosen analyses and write their files; the tables by analysis name."""
    device = torch.device("cpu") if args.cpu else resolve_device("auto")
    chosen = list(ANALYSES) if args.analysis == "all" else [args.analysis]
    teacher, students = load_models(args.teacher, args.students, args.labels, device, progress=args.progress)
    session = Session(
        teacher,
        students,
        classes=args.classes,
        n_per_class=args.n_per_class,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        progress=args.progress,
    )
    evaluator = None
    if "time" in chosen and args.judge:
        from diffusion_lightning.commands.evaluate import load_datamodule

        evaluator = make_evaluator(
            session, args.judge, load_datamodule(args.data), args.n_samples, args.cache_dir, args.batch_size
        )
    elif "time" in chosen:
        print("time: no --judge given, so the accuracy and FID columns are skipped.")
    out = Path(args.out)
    loggers = _make_loggers(args.logger, out)
    jobs: dict[str, Any] = {
        "mse": lambda: mse_heatmap(session, args.timesteps),
        "trajectory": lambda: trajectory_comparison(session),
        "denoising": lambda: denoising_strips(session, args.columns),
        "time": lambda: time_table(session, evaluator, args.repeats),
    }
    tables = {}
    for name in chosen:
        table, figure = jobs[name]()
        paths = write_analysis(out, table, figure, loggers)
        for logger in loggers:
            logger.log_metrics(_scalars(table), step=0)
        tables[name] = table
        print(f"{name}: wrote {paths['csv']}, {paths['json']}, {paths['png']}")
    for logger in loggers:
        logger.finalize("success")
    return tables


def _make_loggers(kind: str, out: Path) -> list[Any]:
    from diffusion_lightning.commands.evaluate import make_loggers

    return make_loggers(kind, out)


def main(argv: Sequence[str] | None = None) -> dict[str, Table]:
    """Entry point of ``diffusion-lightning analyze``; the tables written, by analysis name."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
