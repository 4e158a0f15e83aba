"""Loading what training leaves behind: a checkpoint or an exported pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline
from diffusion_lightning.schedulers import SCHEDULERS, make_scheduler
from diffusion_lightning.utils.checkpoint import load_module

#: Pipeline classes of this package, which ``DiffusionPipeline.from_pretrained`` cannot find in diffusers.
LOCAL_PIPELINES: dict[str, type[DiffusionPipeline]] = {"ClassConditionedPipeline": ClassConditionedPipeline}

#: Sampling defaults of an exported pipeline folder (which records no steps or guidance).
PIPELINE_DEFAULTS: dict[str, Any] = {"steps": 25, "guidance_scale": 2.0}
#: The same for text-to-image pipelines: diffusers' usual guidance for Stable Diffusion.
TEXT_PIPELINE_DEFAULTS: dict[str, Any] = {"steps": 25, "guidance_scale": 7.5}


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", "--ckpt_path", "--ckpt-path", dest="ckpt", help="a .ckpt file written by fit")
    parser.add_argument("--pipeline", help="an exported pipeline folder (or hub id)")
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="with --ckpt: the EMA weights when the run had them (default) or the raw trained ones",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), help="sampling scheduler (default: the pipeline's own)"
    )
    parser.add_argument(
        "--num-inference-steps", "--num_inference_steps", "--steps", dest="steps", type=int,
        help="denoising steps (default: the model's)",
    )  # fmt: skip
    parser.add_argument(
        "--guidance-scale", "--guidance_scale", dest="guidance_scale", type=float,
        help="classifier-free guidance scale, >= 0; 1 disables guidance (default: the model's)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def is_text_pipeline(pipeline: Any) -> bool:
    """Whether ``pipeline`` is conditioned on text (Stable Diffusion and kin: it has a text encoder)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)):
        return True
    return getattr(pipeline, "text_encoder", None) is not None


def _pipeline_class(source: str) -> type[DiffusionPipeline]:
    """The class that loads the pipeline folder (or hub id) ``source``, from its ``model_index.json``."""
    try:
        config = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"error: --pipeline {source!r} could not be read ({error}); give an exported pipeline folder."
        ) from error
    name = config.get("_class_name")
    return LOCAL_PIPELINES.get(name, DiffusionPipeline)


def _load_pipeline_folder(source: str) -> DiffusionPipeline:
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            raise SystemExit(
                f"error: --pipeline {source!r} holds LoRA adapter weights only (pytorch_lora_weights.safetensors); "
                "export the run with --merge-lora for a full pipeline, or sample from its --ckpt."
            )
        raise SystemExit(f"error: --pipeline {source!r} has no model_index.json; is it an exported pipeline?")
    cls = _pipeline_class(source)
    try:
        return cls.from_pretrained(source)
    except AttributeError as error:  # a _class_name that neither diffusers nor this package defines
        raise SystemExit(
            f"error: --pipeline {source!r} names a pipeline class diffusers does not know ({error}); "
            f"this package adds {sorted(LOCAL_PIPELINES)}."
        ) from error


def load_pipeline(args: argparse.Namespace) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The pipeline named by ``--ckpt`` or ``--pipeline`` and the sampling defaults it carries.

    ``--pipeline`` loads any diffusers pipeline folder (the class comes from its ``model_index.json``;
    this package's :class:`ClassConditionedPipeline` included); ``--scheduler`` replaces its scheduler,
    keeping the noise schedule. The defaults are ``steps`` and ``guidance_scale``, plus ``image_size``
    when a ``--ckpt`` module records one.
    """
    if bool(args.ckpt) == bool(args.pipeline):
        raise SystemExit("error: give exactly one of --ckpt FILE or --pipeline DIR.")
    defaults: dict[str, Any] = dict(PIPELINE_DEFAULTS)
    if args.ckpt:
        module = load_module(args.ckpt, weights=args.weights)
        pipeline = module.build_pipeline(args.scheduler)
        defaults = {"steps": module.num_inference_steps, "guidance_scale": module.guidance_scale}
        if getattr(module, "image_size", None):
            defaults["image_size"] = int(module.image_size)
    else:
        pipeline = _load_pipeline_folder(args.pipeline)
        if is_text_pipeline(pipeline):
            defaults = dict(TEXT_PIPELINE_DEFAULTS)
        if args.scheduler:
            pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
    return pipeline, defaults
