"""Load a trained module from a Lightning checkpoint, whichever class wrote it."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from diffusion_lightning.modules.base import DiffusionModule


def _import(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dictionary (on the CPU), with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def module_class(checkpoint: dict[str, Any]) -> type[DiffusionModule]:
    """The :class:`DiffusionModule` subclass that wrote ``checkpoint``."""
    hparams = checkpoint.get("hyper_parameters", {})
    path = hparams.get("_class_path") or checkpoint.get("diffusion_lightning", {}).get("module_class")
    if not path:
        raise ValueError("checkpoint does not record its module class; was it written by diffusion_lightning?")
    cls = _import(path)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionModule)):
        raise ValueError(f"checkpoint module class {path!r} is not a DiffusionModule.")
    return cls


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
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r} is not supported; expected 'ema' or 'raw'.")
    checkpoint = read_checkpoint(path)
    cls = module_class(checkpoint)
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    if weights == "raw" and "current_model_state" in checkpoint:
        module.load_state_dict(checkpoint["current_model_state"])
    return module.eval()
