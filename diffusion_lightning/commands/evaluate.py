"""``diffusion-lightning evaluate``: generate, score, write ``eval/`` and log under ``evals/``."""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from diffusion_lightning.commands.common import add_sampling_arguments, load_pipeline
from diffusion_lightning.metrics.evaluator import (
    DEFAULT_METRICS,
    FEATURE_EXTRACTORS,
    METRICS,
    EvaluationConfig,
    Evaluator,
)
from diffusion_lightning.metrics.judge import DEFAULT_JUDGE
from diffusion_lightning.metrics.report import EvaluationResult
from diffusion_lightning.utils.device import resolve_device

LOGGERS = ("tensorboard", "csv", "wandb", "neptune", "none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-lightning evaluate",
        description="Generate n samples from a checkpoint or pipeline (or take real images), score them with the "
        "digit judge, FID/KID, precision/recall/realism and optionally IS, LPIPS and CLIP score, and write "
        "OUT/metrics.json, OUT/per_class.csv, OUT/worst.png, OUT/samples.png and OUT/confusion.png; the "
        "numbers go to a logger under evals/. Same arguments and seed, same numbers.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", "--ckpt_path", "--ckpt-path", dest="ckpt", help="a .ckpt file written by fit")
    source.add_argument("--pipeline", help="an exported pipeline folder (or hub id)")
    source.add_argument(
        "--real", metavar="SPLIT", help="score real images of this split (train/val/test) instead: a sanity check"
    )
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="with --ckpt: EMA or raw weights")
    parser.add_argument("--out", help="output folder (default: eval/ beside the run or pipeline)")
    parser.add_argument(
        "--n-samples", "--n_samples", dest="n_samples", type=int, default=500,
        help="samples, spread evenly over the classes (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=50,
        help="images per forward (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics", nargs="+", choices=METRICS, default=list(DEFAULT_METRICS),
        help="what to measure (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--feature-extractor", "--feature_extractor", dest="feature_extractor", choices=FEATURE_EXTRACTORS,
        default="auto", help="feature space of FID/KID: inception (local weights), digits (the judge's features) "
        "or auto, Inception when its weights are on disk and the judge's features otherwise (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--judge", default=DEFAULT_JUDGE, help="DigitClassifier checkpoint (default: %(default)s)")
    parser.add_argument("--inception-weights", dest="inception_weights", help="InceptionV3 weights file")
    parser.add_argument("--lpips-weights", dest="lpips_weights", help="the LPIPS backbone's ImageNet weights file")
    parser.add_argument(
        "--allow-random-lpips", dest="allow_random_lpips", action="store_true",
        help="report LPIPS from a random backbone when no weights are found (not comparable to published values)",
    )  # fmt: skip
    parser.add_argument("--clip-model", dest="clip_model", help="local folder of a CLIP model (for --metrics clip)")
    parser.add_argument("--clip-prompt", dest="clip_prompt", default="a handwritten digit {name}")
    parser.add_argument(
        "--data", help="YAML with a data: section (class_path/init_args) for the real images (default: embedded MNIST)"
    )
    parser.add_argument("--reference-split", dest="reference_split", default="train", help="real split compared with")
    parser.add_argument("--cache-dir", dest="cache_dir", help="cache of real-image features")
    parser.add_argument("--threshold", type=float, default=0.7, help="judge probability that counts as a digit")
    parser.add_argument("--k", type=int, default=3, help="neighbour of precision/recall/realism (default: 3)")
    parser.add_argument("--num-worst", dest="num_worst", type=int, default=16, help="samples in worst.png")
    parser.add_argument(
        "--logger", choices=LOGGERS, default="tensorboard", help="where evals/ go (default: %(default)s)"
    )
    parser.add_argument("--step", type=int, help="logger step (default: the checkpoint's global step, else 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_sampling_arguments(parser)
    return parser


def load_datamodule(path: str | None) -> Any:
    """The data module of a YAML config's ``data:`` section, or embedded MNIST."""
    if path is None:
        from diffusion_lightning.data.mnist import MNISTDataModule

        return MNISTDataModule()
    config = yaml.safe_load(Path(path).read_text())
    data = (config or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise SystemExit(f"error: --data {path!r} has no data: section with a class_path.")
    module_name, _, name = data["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), name)(**(data.get("init_args") or {}))


def make_loggers(kind: str, out: Path) -> list[Any]:
    if kind == "none":
        return []
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return [TensorBoardLogger(out, name="logs")]
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(out, name="logs")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return [WandbLogger(save_dir=str(out), project="diffusion_lightning", job_type="evaluate")]
    from diffusion_lightning.loggers.neptune import NeptuneLogger

    return [NeptuneLogger(mode="offline", save_dir=str(out))]


def default_out(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.ckpt:
        return Path(args.ckpt).resolve().parent.parent / "eval"
    if args.pipeline and Path(args.pipeline).exists():
        return Path(args.pipeline).resolve().parent / "eval"
    return Path("outputs") / ("eval-real-" + args.real if args.real else "eval")


def _real_images(datamodule: Any, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule.setup("fit" if split in ("train", "val") else split)
    if split not in datamodule.datasets:
        raise SystemExit(
            f"error: --real {split!r} is not a split of the data; available: {sorted(datamodule.datasets)}."
        )
    dataset = datamodule.datasets[split]
    index = torch.arange(len(dataset))
    if n < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    images = torch.stack([dataset[i]["images"] for i in index.tolist()])
    labels = torch.stack([dataset[i]["labels"] for i in index.tolist()])
    order = torch.sort(labels, stable=True).indices
    return (images[order] / 2 + 0.5).clamp(0, 1), labels[order]


def main(argv: Sequence[str] | None = None) -> EvaluationResult:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = EvaluationConfig(
            n_samples=args.n_samples,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            scheduler=args.scheduler,
            seed=args.seed,
            batch_size=args.batch_size,
            metrics=list(dict.fromkeys(args.metrics)),
            feature_extractor=args.feature_extractor,
            judge=args.judge,
            inception_weights=args.inception_weights,
            lpips_weights=args.lpips_weights,
            allow_random_lpips=args.allow_random_lpips,
            clip_model=args.clip_model,
            clip_prompt=args.clip_prompt,
            reference_split=args.reference_split,
            cache_dir=args.cache_dir,
            threshold=args.threshold,
            k=args.k,
            num_worst=args.num_worst,
            progress=args.progress,
        )
        datamodule = load_datamodule(args.data)
        evaluator = Evaluator(config, datamodule)  # loads every network now: fails before any sampling
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    out = default_out(args)
    step = args.step or 0
    info: dict[str, Any] = {"source": args.ckpt or args.pipeline or f"real:{args.real}"}
    if args.real:
        images, labels = _real_images(datamodule, args.real, args.n_samples, args.seed)
        result = evaluator.score(images, labels, getattr(datamodule, "class_names", None))
    else:
        device = resolve_device(args.device)
        pipeline, defaults = load_pipeline(args)
        pipeline.to(device)
        if args.ckpt and args.step is None:
            step = int(torch.load(args.ckpt, map_location="cpu", weights_only=False).get("global_step", 0))
        info.update(weights=args.weights if args.ckpt else None, device=str(device))
        result = evaluator.evaluate(pipeline, defaults["steps"], defaults["guidance_scale"])
    result.write(out, **info, step=step)
    loggers = make_loggers(args.logger, out)
    result.log(loggers, step=step)
    for logger in loggers:
        logger.finalize("success")
    _print_summary(result, out)
    return result


def _print_summary(result: EvaluationResult, out: Path) -> None:
    values = result.metrics()
    shown = ("accuracy", "weakest_class_accuracy", "is_digit/scores/avg", "realism/scores/avg", "precision", "recall")
    shown += ("fid", "kid", "inception_score", "lpips_diversity", "clip_score", "seconds_per_image")
    for name in shown:
        if name in values:
            print(f"{name:<26} {values[name]:.4f}")
    print(f"wrote {out / 'metrics.json'}, {out / 'per_class.csv'}, {out / 'worst.png'}")
