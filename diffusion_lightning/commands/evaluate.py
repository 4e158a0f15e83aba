"""``diffusion-lightning evaluate``: generate, score, write ``eval/`` and log under ``evals/``.

Class-conditioned models are evaluated over their classes (``per_class.csv``), text-to-image models
over prompts (``--prompts FILE``, else a checkpoint's ``validation_prompts``; ``per_prompt.csv``).
The samples are compared with real images: ``--reference DIR`` (a folder of images, or a captions
folder with ``metadata.jsonl``), else the ``--reference-split`` of ``--data`` (embedded MNIST by default).
An evaluated pipeline folder (``--pipeline DIR``) gets the metrics in its model card ``DIR/README.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jsonargparse import Namespace

from diffusion_lightning.commands.common import (
    CommandParser,
    PipelineSource,
    SamplingOptions,
    add_dataclass_flags,
    from_args,
    load_pipeline,
)
from diffusion_lightning.metrics.evaluator import EvaluationConfig, Evaluator
from diffusion_lightning.metrics.prompts import FORMAT as PROMPTS_FORMAT
from diffusion_lightning.metrics.prompts import PromptSet, read_prompts
from diffusion_lightning.metrics.report import EvaluationResult
from diffusion_lightning.pipelines.conditioning import Conditions, ConditionSpec, condition_spec
from diffusion_lightning.utils.device import resolve_device
from diffusion_lightning.utils.model_card import update_card_metrics

#: Where ``evaluate`` logs its numbers.
LoggerName = Literal["tensorboard", "csv", "wandb", "neptune", "none"]
LOGGERS: tuple[str, ...] = get_args(LoggerName)
#: Fields of :class:`EvaluationConfig` that are not flags of their own: the sampling options come from
#: :class:`SamplingOptions`, the prompts from ``--prompts FILE``.
NOT_FLAGS = ("num_inference_steps", "guidance_scale", "scheduler", "seed", "prompts", "prompt_classes", "kid_subsets")


@dataclass
class EvaluateArguments(PipelineSource):
    """What ``evaluate`` scores and where its results go; how it scores is :class:`EvaluationConfig`.

    Args:
        real: Score real images of this split (train/val/test) instead of generated ones: a sanity check.
        out: Output folder (default: eval/ beside the run or pipeline).
        prompts: Prompts of a text-to-image model: one per line, 'prompt<TAB>class' to give the judge's
            class; # comments are ignored, a blank line between prompts is an error (default with --ckpt: the module's
            validation_prompts). With --real, the classes of captions that name no digit.
        data: YAML with a data: section (class_path/init_args) for the real images (default: embedded MNIST).
        logger: Where the evals/ numbers go.
        step: Logger step (default: the checkpoint's global step, else 0).
    """

    real: str | None = field(default=None, metadata={"metavar": "SPLIT"})
    out: str | None = None
    prompts: str | None = field(default=None, metadata={"metavar": "FILE"})
    data: str | None = None
    logger: LoggerName = "tensorboard"
    step: int | None = None


def build_parser() -> CommandParser:
    """The ``evaluate`` parser: :class:`EvaluateArguments`, :class:`EvaluationConfig` and :class:`SamplingOptions`."""
    parser = CommandParser(
        prog="diffusion-lightning evaluate",
        description="Generate n samples from a checkpoint or pipeline (or take real images), score them with the "
        "digit judge, FID/KID, precision/recall/realism and optionally IS, LPIPS and CLIP score, and write "
        "OUT/metrics.json, OUT/per_class.csv (class models) or OUT/per_prompt.csv (text-to-image models, "
        "--prompts), OUT/worst.png, OUT/samples.png and OUT/confusion.png; the numbers go to a logger under "
        "evals/. Same arguments and seed, same numbers.",
    )
    add_dataclass_flags(parser, EvaluateArguments, one_of=("ckpt", "pipeline", "real"), one_of_required=True)
    add_dataclass_flags(parser, EvaluationConfig, skip=NOT_FLAGS)
    add_dataclass_flags(parser, SamplingOptions)
    return parser


def load_datamodule(path: str | None) -> Any:
    """The data module of a YAML config's ``data:`` section (built as ``fit`` builds it), or embedded MNIST."""
    if path is None:
        from diffusion_lightning.data.mnist import MNISTDataModule

        return MNISTDataModule()
    from diffusion_lightning.utils.config import load_datamodule_config

    try:
        return load_datamodule_config(path)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: --data: {error}") from error


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


def default_out(args: Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.ckpt:
        return Path(args.ckpt).resolve().parent.parent / "eval"
    if args.pipeline and Path(args.pipeline).exists():
        return Path(args.pipeline).resolve().parent / "eval"
    return Path("outputs") / ("eval-real-" + args.real if args.real else "eval")


def _real_images(datamodule: Any, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | Conditions]:
    """``n`` images of ``split`` (seeded) in ``[0, 1]`` and what they show: class labels, or their captions.

    Samples are ordered by class (or caption, in first-seen order); unreadable images are left out.
    """
    datamodule.setup("fit" if split in ("train", "val") else split)
    if split not in datamodule.datasets:
        raise SystemExit(
            f"error: --real {split!r} is not a split of the data; available: {sorted(datamodule.datasets)}."
        )
    dataset = datamodule.datasets[split]
    index = torch.arange(len(dataset))
    if n < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    samples = [sample for sample in (dataset[i] for i in index.tolist()) if isinstance(sample, dict)]
    if not samples:
        raise SystemExit(f"error: --real {split!r}: none of the {index.numel()} images drawn could be read.")
    images = (torch.stack([s["images"] for s in samples]) / 2 + 0.5).clamp(0, 1)
    if "labels" in samples[0]:
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
        order = torch.sort(labels, stable=True).indices
        return images[order], labels[order]
    if "captions" not in samples[0]:
        raise SystemExit(f"error: --real {split!r}: the data's samples have neither labels nor captions.")
    captions = tuple(s["captions"] for s in samples)
    conditions = Conditions("prompt", captions, captions)
    by_caption = torch.sort(conditions.groups(), stable=True).indices.tolist()
    ordered = tuple(captions[i] for i in by_caption)
    return images[by_caption], Conditions("prompt", ordered, ordered)


def _source(args: Namespace) -> str:
    return f"--ckpt {args.ckpt!r}" if args.ckpt else f"--pipeline {args.pipeline!r}"


def _read_prompts(args: Namespace) -> PromptSet | None:
    if args.prompts is None:
        return None
    try:
        return read_prompts(args.prompts)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: --prompts: {error}") from error


def _conditions(
    args: Namespace, spec: ConditionSpec, prompts: PromptSet | None, checkpoint: dict[str, Any]
) -> tuple[Conditions | None, str]:
    """What to generate for the pipeline (``None``: every class) and a description of it.

    A text model's prompts are ``--prompts``, else its spec's defaults, else the ``validation_prompts``
    the ``--ckpt`` module was trained with.
    """
    if spec.kind == "class":
        if prompts is not None:
            raise SystemExit(
                f"error: --prompts {args.prompts!r} is given, but {_source(args)} is class-conditioned "
                f"({spec.num_classes} classes); drop --prompts: every class is evaluated."
            )
        return None, f"{spec.num_classes} classes"
    trained = (checkpoint.get("hyper_parameters") or {}).get("validation_prompts") or ()
    chosen = prompts.prompts if prompts is not None else spec.default_prompts or tuple(trained)
    if not chosen:
        raise SystemExit(
            f"error: {_source(args)} is a text-to-image model and names no default prompts; give --prompts FILE "
            f"({PROMPTS_FORMAT})."
        )
    return spec.resolve(prompts=chosen, owner="--prompts"), f"{len(chosen)} prompts"


def main(argv: Sequence[str] | None = None) -> EvaluationResult:
    """Run ``evaluate`` with the command-line arguments ``argv``; the result (files written, logged).

    Raises:
        SystemExit: With one ``error: ...`` line for a mistake in the arguments or the files they name.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompts = _read_prompts(args)
    if args.reference is not None and not Path(args.reference).is_dir():
        raise SystemExit(
            f"error: --reference {args.reference!r} is not a folder; expected a folder of images or a captions "
            "folder (metadata.jsonl with file_name and text)."
        )
    try:
        config = from_args(
            EvaluationConfig,
            args,
            metrics=list(dict.fromkeys(args.metrics)),
            prompts=list(prompts.prompts) if prompts is not None and not args.real else None,
            prompt_classes=dict(prompts.classes) if prompts is not None else None,
        )
        datamodule = load_datamodule(args.data)
        evaluator = Evaluator(config, datamodule)  # loads every network now: fails before any sampling
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    out = default_out(args)
    step = args.step or 0
    info: dict[str, Any] = {"source": args.ckpt or args.pipeline or f"real:{args.real}"}
    if args.real:
        images, shown = _real_images(datamodule, args.real, args.n_samples, args.seed)
        try:
            result = evaluator.score(images, shown, getattr(datamodule, "class_names", None))
        except ValueError as error:  # e.g. a caption naming no digit for the judge
            raise SystemExit(f"error: --real {args.real!r}: {error}") from error
    else:
        device = resolve_device(args.device)
        pipeline, defaults = load_pipeline(args)
        pipeline.to(device)
        checkpoint: dict[str, Any] = {}
        if args.ckpt:
            from diffusion_lightning.modules.loading import read_checkpoint

            checkpoint = read_checkpoint(args.ckpt)
            step = int(checkpoint.get("global_step", 0)) if args.step is None else step
        spec = defaults.get("condition_spec") or condition_spec(pipeline)
        asked, what = _conditions(args, spec, prompts, checkpoint)
        try:
            conditions = evaluator.conditions(pipeline, asked)  # checks the prompts against the judge before sampling
        except ValueError as error:
            raise SystemExit(f"error: {error}") from error
        info.update(weights=args.weights if args.ckpt else None, device=str(device))
        logging.getLogger(__name__).info("Generating %d samples over %s.", len(conditions), what)
        result = evaluator.evaluate(
            pipeline,
            defaults["steps"],
            defaults["guidance_scale"],
            conditions=conditions,
            image_size=defaults.get("image_size") if spec.kind == "prompt" else None,
        )
    result.write(out, **info, step=step)
    if args.pipeline and not args.real and Path(args.pipeline).is_dir():  # the folder's card holds its last evaluation
        reference = Path(args.reference).name if args.reference else type(datamodule).__name__
        update_card_metrics(args.pipeline, result.metrics(), dataset=reference)
    loggers = make_loggers(args.logger, out)
    result.log(loggers, step=step)
    for logger in loggers:
        logger.finalize("success")
    _print_summary(result, out)
    return result


def _print_summary(result: EvaluationResult, out: Path) -> None:
    values = result.metrics()
    shown = ["accuracy", "weakest_class_accuracy", "weakest_prompt_accuracy", "is_digit/scores/avg"]
    shown += ["realism/scores/avg", "precision", "recall", "fid", "kid", "inception_score", "lpips_diversity"]
    shown += ["clip_score", "seconds_per_image"]
    for name in shown:
        if name in values:
            print(f"{name:<26} {values[name]:.4f}")
    print(f"wrote {out / 'metrics.json'}, {out / (result.table_name + '.csv')}, {out / 'worst.png'}")
