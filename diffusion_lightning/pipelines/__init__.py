"""diffusers pipelines."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusion_lightning.pipelines.class_conditioned import (
    ClassConditionedPipeline,
    ClassConditionedPipelineOutput,
    ClassGridOutput,
)
from diffusion_lightning.pipelines.conditioning import Conditions, ConditionSpec, condition_spec, generate
from diffusion_lightning.utils.io import atomic_write_text

__all__ = [
    "ClassConditionedPipeline",
    "ClassConditionedPipelineOutput",
    "ClassGridOutput",
    "ConditionSpec",
    "Conditions",
    "condition_spec",
    "generate",
    "save_pipeline_code",
]

#: The file of a pipeline folder that holds its pipeline class, for ``from_pretrained(..., custom_pipeline=...)``.
PIPELINE_CODE_FILE = "pipeline.py"


def save_pipeline_code(pipeline: Any, folder: str | os.PathLike[str]) -> list[Path]:
    """Copy the code of this package's classes in a saved pipeline into its folder; the files written.

    The module of a pipeline class of this package goes to ``pipeline.py``, and the module of a
    component class of this package (the concat ``ClassConditionedUnet``) to ``<component>/<module>.py``,
    with ``model_index.json`` naming the component ``[<module>, <class>]``: diffusers' conventions for
    custom pipelines and components. These modules import only torch, NumPy, PIL and diffusers, so
    diffusers alone loads the folder: ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder,
    trust_remote_code=True)``. A diffusers pipeline of diffusers components gets no file.
    """
    folder = Path(folder)
    package = __name__.split(".")[0]
    written = []
    if type(pipeline).__module__.split(".")[0] == package:
        written.append(folder / PIPELINE_CODE_FILE)
        shutil.copyfile(inspect.getsourcefile(type(pipeline)), written[-1])
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    renamed = False
    for name, component in pipeline.components.items():
        cls = type(component)
        if cls.__module__.split(".")[0] != package or not (folder / name).is_dir():
            continue
        module = cls.__module__.rsplit(".", 1)[-1]
        written.append(folder / name / f"{module}.py")
        shutil.copyfile(inspect.getsourcefile(cls), written[-1])
        index[name], renamed = [module, cls.__name__], True
    if renamed:
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written
