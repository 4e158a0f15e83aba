"""``diffusion-lightning sample``: a labelled grid plus one PNG per image."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusion_lightning.commands.common import add_sampling_arguments, add_source_arguments, load_pipeline
from diffusion_lightning.schedulers import scheduler_name
from diffusion_lightning.utils.device import resolve_device
from diffusion_lightning.utils.images import save_images
from diffusion_lightning.utils.io import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-lightning sample",
        description="Generate n images of each class from a checkpoint or an exported pipeline: "
        "OUT/samples.png (one labelled row per class), OUT/class=<c>/sample=<i>.png and OUT/samples.json.",
    )
    add_source_arguments(parser)
    parser.add_argument("--out", default="outputs/samples", help="output folder (default: %(default)s)")
    parser.add_argument("--classes", type=int, nargs="+", help="classes to draw, one grid row each (default: all)")
    parser.add_argument(
        "--n-per-class", "--n_per_class", dest="n_per_class", type=int, default=8,
        help="images per class (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, help="images per forward (default: all at once)"
    )
    parser.add_argument("--scale", type=int, default=2, help="upscaling of the grid image (default: %(default)s)")
    parser.add_argument("--no-images", action="store_true", help="write only the grid, not the per-image files")
    add_sampling_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.n_per_class < 1:
        raise SystemExit(f"error: --n-per-class={args.n_per_class} must be >= 1.")
    device = resolve_device(args.device)
    pipeline, defaults = load_pipeline(args)
    pipeline.to(device)
    steps = args.steps or defaults["steps"]
    guidance = defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    grid = pipeline.generate_grid(
        num_per_class=args.n_per_class,
        classes=args.classes,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        batch_size=args.batch_size,
        scale=args.scale,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid.pil_grid.save(out / "samples.png")
    if not args.no_images:
        save_images(grid.images, grid.class_labels, out, prefix="class")
    write_json(
        out / "samples.json",
        {
            "source": args.ckpt or args.pipeline,
            "weights": args.weights if args.ckpt else None,
            "scheduler": scheduler_name(pipeline.scheduler),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": args.seed,
            "classes": sorted(set(grid.class_labels.tolist())),
            "n_per_class": args.n_per_class,
            "seconds": round(seconds, 3),
            "device": str(device),
        },
    )
    print(f"wrote {out / 'samples.png'} ({grid.images.shape[0]} images, {seconds:.1f} s)")
    return out
