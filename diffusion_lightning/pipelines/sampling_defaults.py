"""The sampling settings an exported pipeline folder was trained for, in ``sampling_defaults.json``.

A diffusers pipeline folder records its scheduler but not how many steps or how much guidance its
model wants: a flow-matching model sampled well at 10 steps, a step-distilled student at 4, a
text-to-image model at guidance 7. ``export`` writes them beside ``model_index.json``::

    {"num_inference_steps": 4, "guidance_scale": 2.0}

and ``sample``, ``evaluate``, ``analyze``, the web app and distillation teachers read them
(:func:`~diffusion_lightning.modules.loading.load_pipeline_source`); options given on the command
line still win. Folders without the file get the package's fixed defaults. diffusers ignores the
file, so the folder loads with ``from_pretrained`` as before.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from diffusion_lightning.utils.io import write_json

__all__ = ["SAMPLING_DEFAULTS_FILE", "read_sampling_defaults", "write_sampling_defaults"]

SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
#: File key -> the key of the defaults dict the loaders return.
_KEYS = {"num_inference_steps": "steps", "guidance_scale": "guidance_scale", "image_size": "image_size"}


def write_sampling_defaults(folder: str | os.PathLike[str], module: Any) -> Path | None:
    """Write ``module``'s ``num_inference_steps``, ``guidance_scale`` (and ``image_size``) into ``folder``."""
    values = {key: getattr(module, key, None) for key in _KEYS}
    values = {key: value for key, value in values.items() if value is not None}
    if "num_inference_steps" not in values:
        return None
    return write_json(Path(folder) / SAMPLING_DEFAULTS_FILE, values)


def read_sampling_defaults(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The defaults recorded in ``folder`` as ``{"steps", "guidance_scale", "image_size"}`` (those present).

    Raises:
        ValueError: When the file is there but is not a JSON object of valid values.
    """
    path = Path(folder) / SAMPLING_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error}); delete it to use the package's defaults.") from error
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: expected a JSON object with {sorted(_KEYS)}; got {type(recorded).__name__}.")
    defaults: dict[str, Any] = {}
    for key, value in recorded.items():
        if key not in _KEYS:
            continue
        if key == "guidance_scale":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not ok:
            accepted = "a finite number >= 0" if key == "guidance_scale" else "an integer >= 1"
            raise ValueError(f"{path}: {key}={value!r} is not valid; accepted: {accepted}.")
        defaults[_KEYS[key]] = float(value) if key == "guidance_scale" else int(value)
    return defaults
