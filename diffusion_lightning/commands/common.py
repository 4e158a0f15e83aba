"""Loading what training leaves behind: a checkpoint or an exported pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline
from diffusion_lightning.schedulers import SCHEDULERS, make_scheduler
from diffusion_lightning.utils.checkpoint import load_module


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


def load_pipeline(args: argparse.Namespace) -> tuple[ClassConditionedPipeline, dict[str, Any]]:
    """The pipeline named by ``--ckpt`` or ``--pipeline`` and the sampling defaults it carries."""
    if bool(args.ckpt) == bool(args.pipeline):
        raise SystemExit("error: give exactly one of --ckpt FILE or --pipeline DIR.")
    defaults: dict[str, Any] = {"steps": 25, "guidance_scale": 2.0}
    if args.ckpt:
        module = load_module(args.ckpt, weights=args.weights)
        pipeline = module.build_pipeline(args.scheduler)
        defaults = {"steps": module.num_inference_steps, "guidance_scale": module.guidance_scale}
    else:
        if Path(args.pipeline).exists() and not (Path(args.pipeline) / "model_index.json").is_file():
            raise SystemExit(
                f"error: --pipeline {args.pipeline!r} has no model_index.json; is it an exported pipeline?"
            )
        pipeline = ClassConditionedPipeline.from_pretrained(args.pipeline)
        if args.scheduler:
            pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
    return pipeline, defaults
