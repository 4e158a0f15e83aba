"""What a study leaves in its output folder, rewritten after every trial.

- ``best.yaml``: the base config(s) with the best trial's parameters, dumped by the command line's
  parser (every field, like the ``config.yaml`` of a run), so ``diffusion-lightning fit --config
  best.yaml`` trains it; ``fixed`` values (usually a short trial budget) are listed in its header
  but not applied;
- ``trials.csv``: ``study.trials_dataframe()``;
- ``optimization_history.png``, ``intermediate_values.png``, ``parallel_coordinate.png``,
  ``param_importances.png``: Optuna's matplotlib plots. A plot that needs more trials than there
  are (importances need two completed trials and two parameters) is skipped with the reason logged.

Each file is written through :mod:`diffusion_lightning.utils.io`'s atomic writers (a temporary file
beside it, then one rename), so an interrupted study never leaves a half-written file. Optuna
draws the plots but writes nothing to disk, hence this module.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from diffusion_lightning.tuning.objective import format_value, parse_config
from diffusion_lightning.tuning.space import SearchSpace
from diffusion_lightning.utils.io import atomic_file, atomic_write_text

__all__ = ["FINISHED", "PLOTS", "StudyReporter", "write_best_config", "write_reports"]

log = logging.getLogger(__name__)

#: States that count as finished trials (``tune --n-trials`` counts these).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
#: Plot files and the ``optuna.visualization.matplotlib`` function drawing each.
PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "intermediate_values.png": "plot_intermediate_values",
    "parallel_coordinate.png": "plot_parallel_coordinate",
    "param_importances.png": "plot_param_importances",
}


def write_best_config(
    path: Path, study: optuna.Study, configs: Sequence[str | os.PathLike[str]], space: SearchSpace
) -> FrozenTrial:
    """Write the base config(s) merged with the best trial's parameters to ``path``.

    Returns:
        The best trial.

    Raises:
        ValueError: When the study has no completed trial.
    """
    best = study.best_trial
    values = {path: best.params[path] for path in space.params if path in best.params}
    namespace, parser = parse_config(configs, [(space.full_path(p), v) for p, v in values.items()])
    body = parser.dump(namespace, format="yaml", skip_unset=False)
    direction = study.direction.name.lower()
    header = [
        f"# Best trial of study {study.study_name!r}: trial {best.number}, "
        f"{space.objective.metric}={best.value!r} ({direction}).",
        "# Base config(s): " + ", ".join(os.fspath(c) for c in configs),
        *(f"#   {p}: {format_value(v)}" for p, v in values.items()),
    ]
    if space.fixed:
        header.append("# The trials also ran with these fixed values, not applied here:")
        header += [f"#   {p}: {format_value(v)}" for p, v in space.fixed.items()]
    header.append(f"# Train it: diffusion-lightning fit --config {path}")
    atomic_write_text(path, "\n".join(header) + "\n" + body)
    return best


def _plot_skip_reason(name: str, complete: int, n_params: int) -> str | None:
    if complete == 0:
        return "no completed trial yet"
    if name == "param_importances.png" and (complete < 2 or n_params < 2):
        return f"needs >= 2 completed trials and >= 2 parameters ({complete} completed, {n_params} parameters)"
    return None


def _save_plot(path: Path, function: str, study: optuna.Study) -> None:
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. flat axes while all values are equal
        axes = getattr(optuna_plots, function)(study)
    figure = getattr(axes, "figure", None) or axes.flat[0].figure
    figure.set_size_inches(9, 5.5)
    figure.tight_layout()
    try:
        with atomic_file(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)


def write_reports(
    out: Path, study: optuna.Study, configs: Sequence[str | os.PathLike[str]], space: SearchSpace
) -> dict[str, str]:
    """Write ``best.yaml``, ``trials.csv`` and the plots into ``out``.

    A file that cannot be written is skipped with its reason: a report never stops a study.

    Returns:
        File name -> ``"written"`` or the reason it was skipped.
    """
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("trials.csv", lambda: atomic_write_text(out / "trials.csv", study.trials_dataframe().to_csv())),
    ]
    if complete:
        jobs.append(("best.yaml", lambda: write_best_config(out / "best.yaml", study, configs, space)))
    else:
        status["best.yaml"] = "no completed trial yet"
    for name, function in PLOTS.items():
        reason = _plot_skip_reason(name, complete, len(space.params))
        if reason:
            status[name] = reason
        else:
            jobs.append((name, functools.partial(_save_plot, out / name, function, study)))
    for name, job in jobs:
        try:
            job()
            status[name] = "written"
        except Exception as error:  # noqa: BLE001 - reported, and the study goes on
            status[name] = f"failed: {type(error).__name__}: {error}"
            log.warning("could not write %s: %s", out / name, status[name])
    return status


class StudyReporter:
    """Optuna callback: one log line per finished trial, then :func:`write_reports`.

    Args:
        out: The study's output folder.
        configs: The base ``--config`` files.
        space: The search.
        target: The number of finished trials the study aims at (shown as progress).
    """

    def __init__(self, out: Path, configs: Sequence[str | os.PathLike[str]], space: SearchSpace, target: int) -> None:
        self.out = Path(out)
        self.configs = list(configs)
        self.space = space
        self.target = target
        self._skips_logged: set[tuple[str, str]] = set()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.info(self.describe(study, trial))
        self.write(study)

    def describe(self, study: optuna.Study, trial: FrozenTrial) -> str:
        """``trial 3 PRUNED at step 6 ...`` with the progress of the study."""
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        metric = self.space.objective.metric
        if trial.state == TrialState.COMPLETE:
            what = f"{metric}={trial.value:.6g}"
        elif trial.state == TrialState.PRUNED:
            step = trial.last_step
            value = trial.intermediate_values.get(step) if step is not None else None
            what = f"at step {step} ({metric}={value:.6g})" if value is not None else "before any report"
        else:
            what = str(trial.user_attrs.get("error", "no error recorded"))[:300]
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else float("nan")
        line = f"trial {trial.number} {trial.state.name} {what} | {params} | {seconds:.1f}s"
        line += f" | {finished}/{self.target} finished"
        if any(t.state == TrialState.COMPLETE for t in trials):
            line += f", best trial {study.best_trial.number} ({study.best_value:.6g})"
        return line

    def write(self, study: optuna.Study) -> dict[str, str]:
        """Write the reports; log each skip reason once."""
        status = write_reports(self.out, study, self.configs, self.space)
        for name, reason in status.items():
            if reason != "written" and not reason.startswith("failed") and (name, reason) not in self._skips_logged:
                self._skips_logged.add((name, reason))
                log.info("skipped %s: %s", name, reason)
        return status
