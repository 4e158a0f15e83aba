"""``diffusion-lightning export``: a checkpoint to a diffusers pipeline folder.

What ``--out`` may be, checked before the checkpoint is read:

- a path that does not exist yet (its parent folders are created), or an empty folder;
- an existing pipeline folder (``model_index.json``, a LoRA export's
  ``pytorch_lora_weights.safetensors``, or a single model's ``config.json`` with
  ``diffusion_pytorch_model.safetensors``, as an exported VAE) with ``--overwrite``: it is replaced as a whole, in one
  step, so it holds the previous pipeline or the new one at every moment.

Anything else is refused with an ``error:`` line and left untouched: a file (the checkpoint itself,
say), a folder that holds something other than a pipeline (a run folder with checkpoints), a path
under a file, a pipeline without ``--overwrite``, or a folder that holds the checkpoint exported.

Every folder written holds a model card, ``README.md`` (see :mod:`diffusion_lightning.utils.model_card`):
its ``license`` is ``--license`` (default ``other``: the terms depend on the data and the base model, which
only the owner can state), it describes the run of the checkpoint (its summary ``metrics.json``,
``config.yaml`` and last ``eval/metrics.json``), and ``samples.png`` beside it is the run's newest sample
grid, else a small grid drawn by the exported model (``--no-samples`` skips the drawing). A
class-conditioned pipeline also holds ``pipeline.py``, with which diffusers alone loads it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_lightning.commands.common import CommandParser, SchedulerName, WeightsName, add_dataclass_flags
from diffusion_lightning.modules.loading import load_module
from diffusion_lightning.utils.io import recover_directory
from diffusion_lightning.utils.model_card import DEFAULT_LICENSE, ModelCardOptions, check_license, read_run

#: Files at the top of a folder that make it a pipeline ``export`` may replace (with ``--overwrite``):
#: a pipeline, a LoRA export, or one diffusers model (an exported AutoencoderKL).
PIPELINE_MARKERS: tuple[tuple[str, ...], ...] = (
    ("model_index.json",),
    ("pytorch_lora_weights.safetensors",),
    ("config.json", "diffusion_pytorch_model.safetensors"),
)

_ACCEPTED = "accepted: a new path, an empty folder, or an existing pipeline folder with --overwrite"


@dataclass
class ExportArguments:
    """What ``diffusion-lightning export`` is given."""

    ckpt: str = field(metadata={"flags": ("--ckpt", "--ckpt-path", "--ckpt_path")})
    """A ``.ckpt`` file written by fit."""
    out: str
    """Pipeline folder to write (see below for an existing one)."""
    overwrite: bool = False
    """Replace --out when it is an existing pipeline folder (never anything else)."""
    scheduler: SchedulerName | None = None
    """The pipeline's sampling scheduler; ``None``: the model's sampler."""
    weights: WeightsName = "ema"
    """The EMA weights when the run had them (``ema``) or the raw trained ones (``raw``)."""
    merge_lora: bool = False
    """LoRA runs: write a full pipeline with the adapters fused in, instead of the adapter weights alone."""
    license: str = DEFAULT_LICENSE
    """License of the weights in the model card: a Hub identifier (apache-2.0, mit, openrail++, ...)."""
    samples: bool = True
    """Draw a small sample grid for the model card when the run left none."""


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="diffusion-lightning export",
        description="Write the model of a checkpoint as a diffusers pipeline folder that loads with "
        "from_pretrained. The folder appears only once complete.",
        epilog="--out is a new path or an empty folder. An existing pipeline folder (with model_index.json, "
        "pytorch_lora_weights.safetensors, or config.json with diffusion_pytorch_model.safetensors) is replaced "
        "only with --overwrite, in one step: it holds the old "
        "pipeline or the new one at every moment, also when export is killed. A file, a folder holding anything "
        "else (e.g. a run folder with checkpoints) or a path under a file is never replaced: export stops with an "
        "error and leaves it as it is. Every folder holds a model card, README.md (--license, the run's summary and "
        "last evaluation), and samples.png: the run's newest sample grid, else a small one drawn "
        "(not with --no-samples).",
    )
    add_dataclass_flags(parser, ExportArguments)
    return parser


def is_pipeline_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with one of the :data:`PIPELINE_MARKERS` sets of files at its top."""
    folder = Path(path)
    return folder.is_dir() and any(all((folder / f).is_file() for f in files) for files in PIPELINE_MARKERS)


def check_out(out: str, ckpt: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that export must not write (see the module documentation).

    An export killed between moving a previous pipeline aside and moving the new one in (on
    systems without an atomic exchange of folders) is repaired first, so the check sees it.

    Raises:
        SystemExit: With one ``error:`` line naming the path and the reason.
    """
    path = Path(out)
    ancestor = next((p for p in path.absolute().parents if os.path.lexists(p)), None)
    if ancestor is not None and not ancestor.is_dir():
        raise SystemExit(f"error: --out {out!r}: {str(ancestor)!r} is a file, not a folder; {_ACCEPTED}.")
    recover_directory(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise SystemExit(
            f"error: --out {out!r} is a file, not a pipeline folder; export never replaces a file; {_ACCEPTED}."
        )
    with os.scandir(path) as entries:
        empty = next(entries, None) is None
    if empty:
        return
    if not is_pipeline_folder(path):
        markers = " or ".join(" + ".join(files) for files in PIPELINE_MARKERS)
        raise SystemExit(
            f"error: --out {out!r} is a folder that is not a pipeline (no {markers}); export never replaces it, "
            f"even with --overwrite; {_ACCEPTED}."
        )
    if Path(ckpt).resolve().is_relative_to(path.resolve()):
        raise SystemExit(f"error: --out {out!r} holds the checkpoint exported ({ckpt!r}); choose another --out.")
    if not overwrite:
        raise SystemExit(f"error: --out {out!r} already holds a pipeline; add --overwrite to replace it.")


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point of ``diffusion-lightning export``; the pipeline folder written."""
    args = build_parser().parse_args(argv)
    try:
        check_license(args.license)
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from error
    check_out(args.out, args.ckpt, args.overwrite)
    try:
        module = load_module(args.ckpt, weights=args.weights)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    if args.merge_lora and getattr(module, "training_mode", None) != "lora":
        raise SystemExit(f"error: --merge-lora applies to LoRA runs; {args.ckpt} was not trained with LoRA.")
    options: dict[str, Any] = {"scheduler": args.scheduler}
    if args.merge_lora:
        options["merge_lora"] = True
    if "card" in inspect.signature(module.export_pipeline).parameters:  # another module's export may take none
        options["card"] = ModelCardOptions(license=args.license, run=read_run(args.ckpt), samples=args.samples)
    try:
        path = module.export_pipeline(args.out, **options)
    except NotADirectoryError as error:  # --out changed since it was checked
        raise SystemExit(f"error: --out {args.out!r}: {error}") from error
    print(f"exported {type(module).__name__} from {args.ckpt} to {path}")
    return path
