"""Optuna hyperparameter search over the command line's YAML configs (``diffusion-lightning tune``).

- :mod:`~diffusion_lightning.tuning.space`: search files (distributions, fixed values, objective);
- :mod:`~diffusion_lightning.tuning.objective`: checks before the first trial, and trials as real
  ``fit`` runs of :class:`~diffusion_lightning.cli.DiffusionCLI`;
- :mod:`~diffusion_lightning.tuning.pruning`: optuna-integration's pruning callback at the global step;
- :mod:`~diffusion_lightning.tuning.report`: ``best.yaml``, ``trials.csv`` and plots;
- :mod:`~diffusion_lightning.tuning.study`: storage, sampler, pruner, resuming and the loop.

Needs the ``tune`` extra (``pip install 'diffusion-lightning[tune]'``).
"""

from __future__ import annotations

from diffusion_lightning.tuning.objective import TrialObjective, check_search, preflight
from diffusion_lightning.tuning.pruning import GlobalStepPruningCallback
from diffusion_lightning.tuning.report import StudyReporter, write_reports
from diffusion_lightning.tuning.space import Objective, ParamSpec, SearchSpace, load_search, parse_search
from diffusion_lightning.tuning.study import TuneSettings, tune

__all__ = [
    "GlobalStepPruningCallback",
    "Objective",
    "ParamSpec",
    "SearchSpace",
    "StudyReporter",
    "TrialObjective",
    "TuneSettings",
    "check_search",
    "load_search",
    "parse_search",
    "preflight",
    "tune",
    "write_reports",
]
