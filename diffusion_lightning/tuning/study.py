"""Run a study: storage, sampler, pruner, recovery of interrupted trials, the optimize loop.

*Storage.* Any SQLAlchemy URL Optuna's ``RDBStorage`` accepts; the default is the SQLite file
``<out>/study.db``. Studies are created with ``load_if_exists=True``: running the same command again
continues the study, and several processes given one server URL (``postgresql://...``) work on one
study together.

*Counting.* ``n_trials`` is the number of *finished* trials (complete, pruned or failed) the study
should hold. A worker runs at most ``n_trials`` minus those already finished, and every worker stops
when the study reaches ``n_trials`` (Optuna's ``MaxTrialsCallback``), so re-running a finished
study runs nothing and concurrent workers overshoot by at most one trial each.

*Interrupted trials.* A killed process leaves its trial ``RUNNING``. Two mechanisms fail them:

- every storage records a heartbeat of the running trial (``heartbeat_interval`` seconds; Optuna's
  ``RDBStorage`` heartbeat), and a trial whose heartbeat is older than twice that is failed by
  Optuna's ``fail_stale_trials`` before each new trial, in any worker: the rule for shared servers,
  where another worker's ``RUNNING`` trial may be alive;
- a SQLite study is taken to belong to one worker at a time (SQLite serializes writers and Optuna
  advises against sharing it between processes), so at start-up every trial a SQLite study still
  has ``RUNNING`` was left by a process that is gone: it is failed at once, with the reason in its
  ``error`` user attribute, instead of after the grace period.

A failed trial (an exception in ``fit``: out of memory, a NaN objective, a bad combination of
values) is recorded ``FAIL`` with its message and the study goes on; ``KeyboardInterrupt`` (and
the ``SystemExit`` Lightning turns it into) fails the running trial and stops the study.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from diffusion_lightning.tuning.objective import TrialObjective, check_search, preflight
from diffusion_lightning.tuning.report import FINISHED, StudyReporter
from diffusion_lightning.tuning.space import PRUNERS, SearchSpace, load_search
from diffusion_lightning.utils.compat import study_storage, trial_id

__all__ = ["SAMPLERS", "TuneSettings", "fail_orphaned_trials", "make_pruner", "make_sampler", "make_storage", "tune"]

log = logging.getLogger(__name__)

#: A sampler ``tune --sampler`` accepts.
Sampler = Literal["tpe", "random", "cmaes"]
#: Samplers ``tune --sampler`` accepts.
SAMPLERS: tuple[str, ...] = get_args(Sampler)
#: A pruner ``tune --pruner`` accepts (:data:`~diffusion_lightning.tuning.space.PRUNERS`).
Pruner = Literal[PRUNERS]  # type: ignore[valid-type]
_PRUNER_CLASSES: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
ORPHANED = "left RUNNING by a tune process that was interrupted"


@dataclass
class TuneSettings:
    """Everything ``diffusion-lightning tune`` is given."""

    configs: list[str] = field(metadata={"flags": ("--config", "-c"), "metavar": "YAML", "repeat": True})
    """Base fit config(s), in order; repeat the flag (or list several) to layer them, as with fit."""
    search: str = field(metadata={"metavar": "YAML"})
    """The search file (see below)."""
    n_trials: int
    """The number of finished trials (complete, pruned or failed) the study should hold; re-running counts those
    already there."""
    study_name: str | None = None
    """Name of the study; default: the search file's name without .yaml."""
    storage: str | None = None
    """SQLAlchemy URL of the study database (default: sqlite:///OUT/study.db; one worker per SQLite file, a server
    such as postgresql://user@host/db for many)."""
    out: str | None = None
    """Output folder; default: outputs/tune/STUDY_NAME."""
    timeout: float | None = None
    """Start no trial after this many seconds."""
    sampler: Sampler = "tpe"
    """Optuna sampler."""
    pruner: Pruner | None = None
    """Optuna pruner; default: the search file's pruner.type, else median."""
    seed: int | None = None
    """Seed of the sampler (give each worker its own)."""
    heartbeat_interval: int = field(default=60, metadata={"flags": ("--heartbeat",), "metavar": "SECONDS"})
    """Seconds between heartbeats of a running trial; a trial silent for twice this is failed."""
    preflight: bool = field(default=True, metadata={"flags": ("--skip-preflight", "--skip_preflight")})
    """Run the one-step check that the objective's metric is logged."""

    def __post_init__(self) -> None:
        if not self.configs:
            raise ValueError("configs is empty: give at least one --config.")
        if self.n_trials < 1:
            raise ValueError(f"n_trials={self.n_trials!r} must be >= 1.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} must be one of {', '.join(SAMPLERS)}.")
        if self.pruner is not None and self.pruner not in PRUNERS:
            raise ValueError(f"pruner={self.pruner!r} must be one of {', '.join(PRUNERS)}.")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout!r} must be > 0 seconds.")
        if self.heartbeat_interval < 1:
            raise ValueError(f"heartbeat_interval={self.heartbeat_interval!r} must be >= 1 second.")
        if self.study_name is None:
            self.study_name = Path(self.search).stem
        if self.out is None:
            self.out = os.path.join("outputs", "tune", self.study_name)
        if self.storage is None:
            self.storage = f"sqlite:///{Path(self.out).resolve() / 'study.db'}"


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` seeded with ``seed``."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise ValueError("sampler='cmaes' needs the cmaes package: pip install cmaes.")
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise ValueError(f"sampler={name!r} must be one of {', '.join(SAMPLERS)}.")


def make_pruner(name: str | None, space: SearchSpace) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (default: the search file's ``pruner.type``, else median) with the file's kwargs.

    The file's keyword arguments belong to the pruner its ``type`` names (any pruner when it names
    none); when ``name`` picks another pruner they are left out, with a log line.

    Raises:
        ValueError: Naming an argument the pruner does not take, or a value it rejects.
    """
    chosen = name or space.pruner_type or "median"
    kwargs = space.pruner_kwargs()
    if kwargs and space.pruner_type not in (None, chosen):
        log.info("pruner %s: the search file's pruner arguments are for %s; not used", chosen, space.pruner_type)
        kwargs = {}
    cls = _PRUNER_CLASSES[chosen]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    for key in kwargs:
        if key not in accepted:
            raise ValueError(
                f"{space.source}: pruner.{key}: not an argument of the {chosen} pruner; accepted: {accepted}."
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{space.source}: pruner ({chosen}, {kwargs}): {error}") from error


def make_storage(url: str, heartbeat_interval: int, attempts: int = 5) -> RDBStorage:
    """Optuna's RDB storage of ``url`` with a heartbeat for running trials.

    Workers started together on an empty database race to create Optuna's tables (PostgreSQL then
    reports a duplicate type or table to all but one): the losers retry, and find the tables made.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=2 * heartbeat_interval)
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def fail_orphaned_trials(study: optuna.Study, reason: str = ORPHANED) -> list[int]:
    """Fail every ``RUNNING`` trial of ``study`` (see the module documentation for when this is safe).

    Returns:
        The numbers of the trials failed.
    """
    storage = study_storage(study)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            storage.set_trial_user_attr(trial_id(trial), "error", reason)
            if storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
                failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished meanwhile
    return failed


def _is_sqlite(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] == "sqlite"


def tune(settings: TuneSettings) -> optuna.Study:
    """Check the search, then run trials until the study holds ``settings.n_trials`` finished ones.

    Returns:
        The study.

    Raises:
        ValueError: When the search, the configs, the sampler or the pruner is wrong (before any
            trial), or when an existing study of that name optimizes the other direction.
    """
    space = load_search(settings.search)
    namespace = check_search(settings.configs, space)
    sampler = make_sampler(settings.sampler, settings.seed)
    pruner = make_pruner(settings.pruner, space)
    if settings.preflight:
        preflight(settings.configs, space, namespace)
    assert settings.out is not None and settings.storage is not None and settings.study_name is not None
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = make_storage(settings.storage, settings.heartbeat_interval)
    direction = space.objective.direction
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="maximize" if direction == "maximize" else "minimize",
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {settings.study_name!r} in {settings.storage} optimizes {study.direction.name.lower()}, "
            f"but objective.direction={direction!r}; use another --study-name."
        )
    study.set_user_attr("metric", space.objective.metric)
    study.set_user_attr("configs", list(settings.configs))
    study.set_user_attr("search", os.fspath(settings.search))
    if _is_sqlite(settings.storage):
        orphaned = fail_orphaned_trials(study)
        if orphaned:
            log.info("failed trial(s) %s: %s", orphaned, ORPHANED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

    existing = len(study.get_trials(deepcopy=False))
    if existing and settings.seed is not None:
        # A seeded sampler restarted on a study that has trials would replay the draws of its first
        # run (TPE's start-up trials are random): continue from a seed the earlier runs did not use.
        study.sampler = make_sampler(settings.sampler, settings.seed + existing)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    remaining = max(0, settings.n_trials - finished)
    log.info(
        "study %r (%s, %s %s): %d finished trial(s), %d to run; outputs in %s",
        settings.study_name, settings.storage, direction, space.objective.metric, finished, remaining, out,
    )  # fmt: skip
    reporter = StudyReporter(out, settings.configs, space, settings.n_trials)
    objective = TrialObjective(settings.configs, space, namespace, out)
    try:
        if remaining:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=settings.timeout,
                catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED), reporter],
                gc_after_trial=True,
            )
    finally:
        reporter.write(study)
    return study
