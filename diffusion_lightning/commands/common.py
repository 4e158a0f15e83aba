"""Command-line options for what training leaves behind (a checkpoint or an exported pipeline), and loading it.

The loading itself is :mod:`diffusion_lightning.modules.loading`; here its errors become the commands' messages.
"""

from __future__ import annotations

import argparse
from typing import Any

from diffusers import DiffusionPipeline

from diffusion_lightning.modules.loading import WEIGHTS, load_pipeline_source
from diffusion_lightning.schedulers import SCHEDULERS


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ckpt``, ``--pipeline`` and ``--weights``: where the model comes from."""
    parser.add_argument("--ckpt", "--ckpt_path", "--ckpt-path", dest="ckpt", help="a .ckpt file written by fit")
    parser.add_argument("--pipeline", help="an exported pipeline folder (or hub id)")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="ema",
        help="with --ckpt: the EMA weights when the run had them (default) or the raw trained ones",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scheduler``, ``--steps``, ``--guidance-scale``, ``--seed`` and ``--device``: how it samples."""
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


def load_pipeline(args: argparse.Namespace) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The pipeline named by ``--ckpt`` or ``--pipeline`` and the sampling defaults it carries.

    ``--pipeline`` loads any diffusers pipeline folder (the class comes from its ``model_index.json``;
    this package's :class:`ClassConditionedPipeline` included); ``--scheduler`` replaces its scheduler,
    keeping the noise schedule. The defaults are ``steps`` and ``guidance_scale``, plus ``image_size``
    when a ``--ckpt`` module records one (see :func:`~diffusion_lightning.modules.loading.load_pipeline_source`).

    Raises:
        SystemExit: With an ``error: ...`` message when the options or the source are not usable.
    """
    if bool(args.ckpt) == bool(args.pipeline):
        raise SystemExit("error: give exactly one of --ckpt FILE or --pipeline DIR.")
    try:
        return load_pipeline_source(
            ckpt=args.ckpt or None, pipeline=args.pipeline or None, weights=args.weights, scheduler=args.scheduler
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
