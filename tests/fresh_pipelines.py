"""Load exported pipeline folders in a fresh Python process that imports diffusers alone.

That is how a user of an exported model meets it: the tests of every architecture run their
exports through :func:`run_fresh` and compare its images (and its silence) with the module's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

#: Load each job's pipeline folder recording every warning of diffusers, transformers and Python,
#: optionally load a LoRA file into it, and generate one image at 16 px in 2 steps.
FRESH_PROCESS = r"""
import json, logging, sys, traceback, warnings
import diffusers
import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

jobs, out, pipeline_class, guidance = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
cls = getattr(diffusers, pipeline_class)
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name}: {record.getMessage()}")

for library in (diffusers_logging, transformers_logging):
    library.set_verbosity_warning()
    library.disable_progress_bar()
    library.get_logger().addHandler(Keep())
result = {"warnings": {}, "images": {}, "errors": {}}
for name, job in jobs.items():
    records.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = cls.from_pretrained(job["folder"])
        if job.get("lora"):
            pipeline.load_lora_weights(job["lora"])
    result["warnings"][name] = records + [f"{w.category.__name__}: {w.message}" for w in caught]
    pipeline.set_progress_bar_config(disable=True)
    try:
        images = pipeline(job["prompt"], num_inference_steps=2, guidance_scale=guidance, height=16, width=16,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
        result["images"][name] = images
    except Exception:  # reported after the warnings, which say why
        result["errors"][name] = traceback.format_exc()
torch.save(result, out)
"""


def run_fresh(tmp_path: Path, pipeline_class: str, jobs: dict[str, dict], guidance_scale: float) -> dict:
    """Run :data:`FRESH_PROCESS` with ``diffusers.<pipeline_class>`` on ``jobs``.

    Each job is ``{"folder", "prompt"[, "lora"]}``; returns ``warnings``, ``images`` and generation
    ``errors``, each keyed by job name.
    """
    out = tmp_path / "fresh.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DIFFUSERS_VERBOSITY", None)
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs), str(out), pipeline_class, str(guidance_scale)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)
