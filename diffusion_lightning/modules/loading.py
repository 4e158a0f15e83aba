"""Load what training leaves behind: a module from a checkpoint, a pipeline from a checkpoint or a folder.

Every command and every teacher goes through here:

- :func:`load_module` rebuilds the module a ``.ckpt`` was written by (whichever
  :class:`DiffusionModule` subclass, or another module with ``export_pipeline``), with its EMA or raw weights;
- :func:`load_pipeline_source` gives a diffusers pipeline and its sampling defaults from either a
  checkpoint or an exported pipeline folder (``export``, ``save_pretrained``), optionally checked
  to be of a given pipeline class and with another sampling scheduler.

The class a checkpoint names is resolved by jsonargparse, as LightningCLI resolves a ``class_path``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from lightning.pytorch import LightningModule

from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.modules.trained_weights import TrainedWeightsCheckpoint
from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline
from diffusion_lightning.pipelines.conditioning import condition_spec
from diffusion_lightning.pipelines.sampling_defaults import read_sampling_defaults
from diffusion_lightning.schedulers import make_scheduler
from diffusion_lightning.utils.config import resolve_class

__all__ = [
    "LOCAL_PIPELINES",
    "PIPELINE_DEFAULTS",
    "TEXT_PIPELINE_DEFAULTS",
    "WEIGHTS",
    "is_hub_id",
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
#: Sampling defaults of a pipeline folder that records none (no ``sampling_defaults.json``).
PIPELINE_DEFAULTS: dict[str, Any] = {"steps": 25, "guidance_scale": 2.0}
#: The same for text-to-image pipelines: diffusers' usual guidance for Stable Diffusion.
TEXT_PIPELINE_DEFAULTS: dict[str, Any] = {"steps": 25, "guidance_scale": 7.5}


# ---------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dictionary (on the CPU), with a clear error for a missing, damaged or foreign file.

    Args:
        path: A ``.ckpt`` file written by ``fit``.
        mmap: Map the tensors of the file instead of reading them (a cheap check that it loads).

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        ValueError: When ``path`` is a folder, a file torch cannot load (empty, truncated, not written
            by ``torch.save``, or holding objects whose code does not import here), or not a
            Lightning checkpoint. The message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder; expected a .ckpt file written by fit.")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:  # only a zip archive (what torch.save writes) can be mapped; anything else is read, to see its error
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and zipfile.is_zipfile(path))
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, ImportError, AttributeError) as error:
        raise ValueError(_unreadable(path, error)) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def _unreadable(path: Path, error: BaseException) -> str:
    """Why torch could not load the file ``path`` (``error``), in one line naming the file."""
    with path.open("rb") as file:
        head = file.read(4)
    reason = " ".join(str(error).split()).split(". This is an internal")[0]  # torch's advice follows
    noise = r"^PytorchStreamReader failed reading zip archive: |^\[enforce fail at [^\]]*\]\s*\.?\s*"
    reason = re.sub(noise, "", reason).rstrip(".")
    if not head:
        what = "is empty"
    elif head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        what = "is truncated or corrupted (an interrupted copy or save?)"
    elif isinstance(error, (ImportError, AttributeError)):
        what = "holds objects whose code does not import here"
    else:
        what = "is not a checkpoint written by torch.save"
    return f"checkpoint {str(path)!r} {what}; torch could not read it ({reason})."


def module_class(checkpoint: dict[str, Any], source: str | os.PathLike[str] = "checkpoint") -> type[LightningModule]:
    """The module class that wrote ``checkpoint``: a :class:`DiffusionModule` or another exportable module.

    Any ``LightningModule`` with an ``export_pipeline`` method is accepted (e.g.
    :class:`~diffusion_lightning.modules.autoencoder.AutoencoderKLModule`).

    Args:
        checkpoint: A checkpoint dictionary (:func:`read_checkpoint`).
        source: Where it came from, for error messages.

    Raises:
        ValueError: When the checkpoint records no class, or one that is not an importable
            ``LightningModule`` with an ``export_pipeline`` method.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    path = hparams.get("_class_path") or (checkpoint.get("diffusion_lightning") or {}).get("module_class")
    if not path:
        raise ValueError(
            f"{str(source)!r} does not record its module class (no hyper_parameters._class_path or "
            "diffusion_lightning.module_class); was it written by diffusion_lightning?"
        )
    accepted = "accepted: a DiffusionModule subclass, or another LightningModule with export_pipeline"
    try:
        cls = resolve_class(path, LightningModule, field=f"checkpoint {str(source)!r}: module class")
    except ValueError as error:
        raise ValueError(f"{error} ({accepted})") from error
    if not callable(getattr(cls, "export_pipeline", None)):
        raise ValueError(f"checkpoint {str(source)!r}: class {path!r} has no export_pipeline method; {accepted}.")
    return cls


def load_module(
    path: str | os.PathLike[str], weights: str = "ema", map_location: str | torch.device = "cpu"
) -> LightningModule:
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


#: Seconds the hub may take to say whether a repository exists (one request, no retries).
HUB_LOOKUP_TIMEOUT = 10.0


def is_hub_id(source: str) -> bool:
    """Whether a pipeline ``source`` names a hub repository rather than a local path.

    The rule: an existing path is local, and so is anything that reads as a path, which is then
    checked on this machine only: a source that starts with ``.``, ``/`` or ``~``, holds a backslash
    (or the OS's other separator), has no ``/`` or more than one (hub pipelines are ``owner/name``),
    is not a valid repository id, or whose ``owner`` part is an existing local folder. What is left,
    an ``owner/name`` that is nowhere on disk, is a hub id.
    """
    if os.path.lexists(source) or source.startswith((".", "/", "~")):
        return False
    if "\\" in source or (os.altsep and os.altsep != "/" and os.altsep in source) or source.count("/") != 1:
        return False
    if os.path.isdir(source.split("/")[0]):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _local_folder(source: str) -> str:
    """The pipeline folder ``source`` (``~`` expanded), checked on this machine without reaching the hub."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"pipeline={source!r} does not exist; give an exported pipeline folder (with model_index.json) "
            "or a hub repository id owner/name."
        )
    if path.is_file():
        raise ValueError(
            f"pipeline={source!r} is a file; give an exported pipeline folder (with model_index.json); a .ckpt "
            "checkpoint is read with --ckpt."
        )
    if not (path / "model_index.json").is_file():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            raise ValueError(
                f"pipeline={source!r} holds LoRA adapter weights only (pytorch_lora_weights.safetensors); "
                "export the run with --merge-lora for a full pipeline, or sample from its checkpoint."
            )
        raise ValueError(f"pipeline={source!r} has no model_index.json; is it an exported pipeline?")
    return os.fspath(path)


def _hub_local_only(repo_id: str) -> tuple[bool, BaseException | None]:
    """Whether the hub repository ``repo_id`` must be read from the local cache, and why.

    Offline (``HF_HUB_OFFLINE=1``) only the cache is read. Online, one request with a short timeout
    and no retries asks the hub whether the repository exists, so that a missing one fails at once
    and an unreachable hub falls back to the cache rather than to a long series of retried downloads.

    Raises:
        ValueError: When the hub answers that there is no such repository.
    """
    if huggingface_hub.is_offline_mode():
        return True, None
    try:
        HfApi().repo_info(repo_id, timeout=HUB_LOOKUP_TIMEOUT)
    except GatedRepoError:  # it exists; downloading it needs access, which from_pretrained reports
        return False, None
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"pipeline={repo_id!r} is not a local folder, and the hub ({huggingface_hub.constants.ENDPOINT}) has no "
            f"repository of that name (or a private one this machine has no token for); give an exported pipeline "
            f"folder (a relative one as ./{repo_id}) or an existing hub id."
        ) from error
    except Exception as error:  # any failure to reach the hub: only its local cache can answer now
        return True, error
    return False, None


def _pipeline_index(source: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Where to load the pipeline ``source`` from, the ``from_pretrained`` arguments that needs, and its index.

    Returns:
        ``(location, options, model_index)``: the folder (``~`` expanded) or hub id, ``local_files_only``
        when only the hub cache may be read, and the ``model_index.json`` contents.
    """
    hub = is_hub_id(source)
    location = source if hub else _local_folder(source)
    local_only, unreachable = _hub_local_only(source) if hub else (False, None)
    options = {"local_files_only": True} if local_only else {}
    try:
        return location, options, DiffusionPipeline.load_config(location, **options)
    except (OSError, ValueError) as error:
        if unreachable is not None:
            raise ValueError(
                f"pipeline={source!r} is not a local folder, and as a hub id (owner/name) it is neither in the "
                f"local cache nor reachable at {huggingface_hub.constants.ENDPOINT} ({unreachable}); give an "
                "exported pipeline folder, or retry with a network."
            ) from error
        kind = "a hub id" if hub else "a pipeline folder"
        raise ValueError(
            f"pipeline={source!r} could not be read as {kind} ({error}); give an exported pipeline folder "
            "(with model_index.json) or a hub repository id owner/name."
        ) from error


def _load_folder(source: str, expect: type[DiffusionPipeline] | None) -> DiffusionPipeline:
    """The pipeline folder (or hub repository) ``source``, loaded with this package's class or diffusers' own."""
    location, options, index = _pipeline_index(source)
    name = index.get("_class_name") or ""
    if expect is not None:
        named = LOCAL_PIPELINES.get(name) or getattr(diffusers, name, None)
        if not (isinstance(named, type) and issubclass(named, expect)):
            raise ValueError(
                f"pipeline={source!r} holds a {name or 'pipeline of no class'}; expected a {expect.__name__}."
            )
    try:
        return LOCAL_PIPELINES.get(name, DiffusionPipeline).from_pretrained(location, **options)
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
    :class:`ClassConditionedPipeline` included), with the steps and guidance its export recorded
    (:mod:`~diffusion_lightning.pipelines.sampling_defaults`), else :data:`PIPELINE_DEFAULTS` (or
    :data:`TEXT_PIPELINE_DEFAULTS` for text-to-image pipelines).

    Args:
        ckpt: A ``.ckpt`` file written by ``fit``.
        pipeline: An exported pipeline folder, or a hub id ``owner/name`` (see :func:`is_hub_id`); exactly
            one of ``ckpt`` and ``pipeline``.
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
        if not isinstance(module, DiffusionModule):
            raise ValueError(
                f"ckpt={os.fspath(ckpt)!r} holds a {type(module).__name__}, which has no sampling pipeline; "
                "accepted: a checkpoint of a DiffusionModule."
            )
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
    if Path(pipeline).is_dir():  # a hub id's folder is in diffusers' cache; it falls back to the fixed defaults
        defaults.update(read_sampling_defaults(pipeline))
    defaults["condition_spec"] = spec
    if scheduler:
        loaded.scheduler = make_scheduler(scheduler, loaded.scheduler.config)
    return loaded, defaults
