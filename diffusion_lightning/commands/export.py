"""``diffusion-lightning export``: a checkpoint to a diffusers pipeline folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from diffusion_lightning.modules.loading import WEIGHTS, load_module
from diffusion_lightning.schedulers import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-lightning export",
        description="Write the model of a checkpoint as a diffusers pipeline folder that loads with "
        "from_pretrained. The folder appears only once complete.",
    )
    parser.add_argument(
        "--ckpt", "--ckpt_path", "--ckpt-path", dest="ckpt", required=True, help="a .ckpt file written by fit"
    )
    parser.add_argument("--out", required=True, help="pipeline folder to write (replaced if it exists)")
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        help="the pipeline's sampling scheduler (default: the model's sampler)",
    )
    parser.add_argument(
        "--weights", choices=WEIGHTS, default="ema",
        help="the EMA weights when the run had them (default) or the raw trained ones",
    )  # fmt: skip
    parser.add_argument(
        "--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
        help="LoRA runs: write a full pipeline with the adapters fused in, instead of the adapter weights alone",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point of ``diffusion-lightning export``; the pipeline folder written."""
    args = build_parser().parse_args(argv)
    try:
        module = load_module(args.ckpt, weights=args.weights)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    if args.merge_lora:
        if getattr(module, "training_mode", None) != "lora":
            raise SystemExit(f"error: --merge-lora applies to LoRA runs; {args.ckpt} was not trained with LoRA.")
        path = module.export_pipeline(args.out, scheduler=args.scheduler, merge_lora=True)
    else:
        path = module.export_pipeline(args.out, scheduler=args.scheduler)
    print(f"exported {type(module).__name__} from {args.ckpt} to {path}")
    return path
