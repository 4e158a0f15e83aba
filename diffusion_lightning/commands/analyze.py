"""``diffusion-lightning analyze``: compare students with their teacher (MSE, trajectories, denoising, time)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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
from diffusion_lightning.utils.device import resolve_device

ANALYSES = ("mse", "trajectory", "denoising", "time")
LOGGERS = ("tensorboard", "csv", "none")

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-lightning analyze",
        description="Compare student networks with their teacher from the same noise and classes: prediction MSE "
        "per timestep (mse), DDIM trajectories (trajectory), x_t / predicted x_0 strips (denoising), and latency, "
        "parameters, MACs and optional judge quality (time). Writes OUT/<analysis>.csv, .json and .png.",
    )
    parser.add_argument("analysis", choices=(*ANALYSES, "all"), help="what to run (all: the four)")
    parser.add_argument("--teacher", required=True, help="teacher: a .ckpt file or a pipeline folder")
    parser.add_argument("--students", nargs="+", required=True, help="students: .ckpt files or pipeline folders")
    parser.add_argument("--labels", nargs="+", help="student names (default: their folder or file names)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", nargs="+", type=int, help="classes to sample (default: all)")
    parser.add_argument(
        "--n-per-class", "--n_per_class", dest="n_per_class", type=int, default=4,
        help="samples per class (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    parser.add_argument(
        "--guidance-scale", "--guidance_scale", dest="guidance_scale", type=float,
        help="classifier-free guidance scale (default: the teacher's, 2.0 when unknown)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared noise (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument(
        "--timesteps", type=int, default=20, help="mse: evenly spaced training timesteps (default: %(default)s)"
    )
    parser.add_argument(
        "--columns", type=int, default=5, help="denoising: steps shown per strip (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="time: UNet forwards per latency median (default: %(default)s)"
    )
    parser.add_argument("--judge", help="time: DigitClassifier checkpoint for accuracy and FID (default: skipped)")
    parser.add_argument(
        "--n-samples", "--n_samples", dest="n_samples", type=int, default=500,
        help="time: samples per model for the judge (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--data", help="time: YAML with a data: section for FID's real images (default: embedded MNIST)"
    )
    parser.add_argument("--cache-dir", dest="cache_dir", help="time: cache of real-image features")
    parser.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, default=50, help="time: judge batch size"
    )
    parser.add_argument("--logger", choices=LOGGERS, default="tensorboard", help="where PNGs go (OUT/logs)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
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


def run(args: argparse.Namespace) -> dict[str, Table]:
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
