"""Load what training leaves behind: a module from a checkpoint, a pipeline from a checkpoint or a folder.

Every command and every teacher goes through here:

- :func:`load_module` rebuilds the module a ``.ckpt`` was written by (whichever
  :class:`DiffusionModule` subclass), with its EMA or raw weights;
- :func:`load_pipeline_source` gives a diffusers pipeline and its sampling defaults from either a
  checkpoint or an exported pipeline folder (``export``, ``save_pretrained``), optionally checked
  to be of a given pipeline class and with another sampling scheduler.

The class a checkpoint names is resolved by jsonargparse, as LightningCLI resolves a ``class_path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.modules.trained_weights import TrainedWeightsCheckpoint
from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline
from diffusion_lightning.pipelines.conditioning import condition_spec
from diffusion_lightning.schedulers import make_scheduler
from diffusion_lightning.utils.config import resolve_class

__all__ = [
    "LOCAL_PIPELINES",
    "PIPELINE_DEFAULTS",
    "TEXT_PIPELINE_DEFAULTS",
    "WEIGHTS",
    "load_module",
    "load_pipeline_source",
    "module_class",
    "read_checkpoint",
    "source_kind",
]

#: Which weights of a checkpoint to load: the averaged (EMA) ones when the run had them, or the trained ones.
WEIGHTS = ("ema", "raw")
#: Pipeline classes of this package, which ``DiffusionPipeline.from_pretrained`` cannot find in diffusers.
LOCAL_PIPELINES: dict[str, type[DiffusionPipeline]] = {"ClassConditionedPipeline": ClassConditionedPipeline}
#: Sampling defaults of an exported pipeline folder (which records no steps or guidance).
PIPELINE_DEFAULTS: dict[str, Any] = {"steps": 25, "guidance_scale": 2.0}
#: The same for text-to-image pipelines: diffusers' usual guidance for Stable Diffusion.
TEXT_PIPELINE_DEFAULTS: dict[str, Any] = {"steps": 25, "guidance_scale": 7.5}


# ---------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dictionary (on the CPU), with a clear error for a missing or foreign file.

    Raises:
        FileNotFoundError: When ``path`` is not a file.
        ValueError: When the file is not a Lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def module_class(checkpoint: dict[str, Any], source: str | os.PathLike[str] = "checkpoint") -> type[DiffusionModule]:
    """The :class:`DiffusionModule` subclass that wrote ``checkpoint``.

    Args:
        checkpoint: A checkpoint dictionary (:func:`read_checkpoint`).
        source: Where it came from, for error messages.

    Raises:
        ValueError: When the checkpoint records no class, or one that is not an importable
            :class:`DiffusionModule` subclass.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    path = hparams.get("_class_path") or (checkpoint.get("diffusion_lightning") or {}).get("module_class")
    if not path:
        raise ValueError(
            f"{str(source)!r} does not record its module class (no hyper_parameters._class_path or "
            "diffusion_lightning.module_class); was it written by diffusion_lightning?"
        )
    return resolve_class(path, DiffusionModule, field=f"module class of {str(source)!r}")


def load_module(
    path: str | os.PathLike[str], weights: str = "ema", map_location: str | torch.device = "cpu"
) -> DiffusionModule:
    """Rebuild the module saved in ``path`` with its weights, in eval mode.

    A run with the :class:`~diffusion_lightning.callbacks.ema.EMA` callback (or any Lightning weight
    averaging) stores the averaged weights under ``state_dict``, which ``load_from_checkpoint`` reads,
    and the trained ones under ``current_model_state``.

    Args:
        path: A ``.ckpt`` file written by ``fit``.
        weights: ``ema`` - the averaged weights when the run used EMA (else the trained ones);
            ``raw`` - the trained weights, without averaging.
        map_location: Where to put the weights.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        ValueError: For a bad ``weights`` or a file that is not a checkpoint of this package.
    """
    check_choice("weights", weights, WEIGHTS)
    checkpoint = read_checkpoint(path)
    cls = module_class(checkpoint, path)
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    if weights == "raw" and "current_model_state" in checkpoint:
        raw = checkpoint["current_model_state"]
        if isinstance(module, TrainedWeightsCheckpoint):  # it keeps only trained weights: add the frozen ones back
            raw = module.complete_state(raw, "current_model_state")
        module.load_state_dict(raw)
    return module.eval()


# ---------------------------------------------------------------------- pipelines


def source_kind(path: str | os.PathLike[str]) -> str | None:
    """``"ckpt"`` for a file (a checkpoint), ``"pipeline"`` for a folder with ``model_index.json``, else ``None``."""
    source = Path(path)
    if source.is_file():
        return "ckpt"
    if (source / "model_index.json").is_file():
        return "pipeline"
    return None


def _class_name(source: str) -> str | None:
    """The ``_class_name`` in the ``model_index.json`` of a pipeline folder (or hub id), once the folder is checked."""
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            raise ValueError(
                f"pipeline={source!r} holds LoRA adapter weights only (pytorch_lora_weights.safetensors); "
                "export the run with --merge-lora for a full pipeline, or sample from its checkpoint."
            )
        raise ValueError(f"pipeline={source!r} has no model_index.json; is it an exported pipeline?")
    try:
        config = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"pipeline={source!r} could not be read ({error}); give an exported pipeline folder."
        ) from error
    return config.get("_class_name")


def _load_folder(source: str, expect: type[DiffusionPipeline] | None) -> DiffusionPipeline:
    """The pipeline folder ``source``, loaded with this package's class or diffusers' own resolution."""
    name = _class_name(source) or ""
    if expect is not None:
        named = LOCAL_PIPELINES.get(name) or getattr(diffusers, name, None)
        if not (isinstance(named, type) and issubclass(named, expect)):
            raise ValueError(
                f"pipeline={source!r} holds a {name or 'pipeline of no class'}; expected a {expect.__name__}."
            )
    try:
        return LOCAL_PIPELINES.get(name, DiffusionPipeline).from_pretrained(source)
    except AttributeError as error:  # a _class_name that neither diffusers nor this package defines
        raise ValueError(
            f"pipeline={source!r} names a pipeline class diffusers does not know ({error}); "
            f"this package adds {sorted(LOCAL_PIPELINES)}."
        ) from error


def load_pipeline_source(
    ckpt: str | os.PathLike[str] | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    weights: str = "ema",
    scheduler: str | None = None,
    expect: type[DiffusionPipeline] | None = None,
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The pipeline of a checkpoint or of an exported folder, and the sampling defaults it carries.

    A checkpoint gives its module's pipeline (``build_pipeline``) with the module's sampler, steps
    and guidance; a folder loads with the class its ``model_index.json`` names (this package's
    :class:`ClassConditionedPipeline` included), with :data:`PIPELINE_DEFAULTS` (or
    :data:`TEXT_PIPELINE_DEFAULTS` for text-to-image pipelines).

    Args:
        ckpt: A ``.ckpt`` file written by ``fit``.
        pipeline: An exported pipeline folder (or hub id); exactly one of ``ckpt`` and ``pipeline``.
        weights: With ``ckpt``: ``ema`` or ``raw`` weights (see :func:`load_module`).
        scheduler: A sampling scheduler name (see :data:`~diffusion_lightning.schedulers.SCHEDULERS`)
            that replaces the pipeline's, on the same noise schedule; ``None`` keeps it.
        expect: A pipeline class the source must hold (a folder is checked before it is loaded).

    Returns:
        ``(pipeline, defaults)``: ``defaults`` has ``steps`` and ``guidance_scale``, plus
        ``image_size`` when the checkpoint's module records one.

    Raises:
        FileNotFoundError: When ``ckpt`` does not exist.
        ValueError: When not exactly one source is given, or it does not hold what is asked.
    """
    if (ckpt is None) == (pipeline is None):
        raise ValueError(
            f"give exactly one of ckpt (a .ckpt file) or pipeline (a pipeline folder); got ckpt={ckpt!r}, "
            f"pipeline={pipeline!r}."
        )
    if ckpt is not None:
        module = load_module(ckpt, weights=weights)
        built = module.build_pipeline(scheduler)
        if expect is not None and not isinstance(built, expect):
            raise ValueError(
                f"ckpt={os.fspath(ckpt)!r} holds a {type(module).__name__}, whose pipeline is a "
                f"{type(built).__name__}; expected a {expect.__name__}."
            )
        defaults: dict[str, Any] = {"steps": module.num_inference_steps, "guidance_scale": module.guidance_scale}
        if getattr(module, "image_size", None):
            defaults["image_size"] = int(module.image_size)
        defaults["condition_spec"] = module.condition_spec()
        return built, defaults
    assert pipeline is not None
    loaded = _load_folder(os.fspath(pipeline), expect)
    spec = condition_spec(loaded)
    defaults = dict(TEXT_PIPELINE_DEFAULTS if spec.kind == "prompt" else PIPELINE_DEFAULTS)
    defaults["condition_spec"] = spec
    if scheduler:
        loaded.scheduler = make_scheduler(scheduler, loaded.scheduler.config)
    return loaded, defaults
