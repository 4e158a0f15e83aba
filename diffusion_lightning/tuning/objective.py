"""Trials as real ``fit`` runs of the command line, and the checks made before the first one.

Every trial is ``diffusion-lightning fit --config ... --path value ...`` built by
:class:`~diffusion_lightning.cli.DiffusionCLI` itself, so a trial trains exactly what the same
command typed by hand would train (links, defaults, checkpoints, the saved ``config.yaml``). The
search's values go in as command-line overrides: ``fixed`` first, then the trial's ``params``, then
what every trial gets (its run folder ``<out>/trials/trial_<number>``, the logger version
``trial_<number>`` and the pruning callback).

Before the first trial, :func:`check_search` parses the base config with the command line's own
parser, resolves every path of the search against that namespace, parses the extremes of every
distribution (the bounds, every choice) so a value the field's type rejects fails now, and
:func:`preflight` runs one training step and one validation batch to see that the objective's
metric is logged. optuna-integration offers the pruning callback only; this wiring is specific to
the project's command line, hence written here.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import shlex
import socket
import tempfile
import time
import warnings
from argparse import ArgumentError
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from diffusion_lightning.cli import DiffusionCLI
from diffusion_lightning.loggers.runs import logger_class, logger_entries  # the same reading of trainer.logger as fit
from diffusion_lightning.tuning.pruning import GlobalStepPruningCallback
from diffusion_lightning.tuning.space import SearchSpace

__all__ = ["TrialObjective", "check_search", "config_args", "format_value", "parse_config", "preflight"]

log = logging.getLogger(__name__)

#: Parser options of every command line built here: errors raise instead of exiting the process.
PARSER_KWARGS: dict[str, Any] = {"exit_on_error": False, "fit": {"exit_on_error": False}}
#: LightningCLI warns when it is given ``args`` while ``sys.argv`` holds the ``tune`` command line: expected here.
_ARGS_WARNING = "LightningCLI's args parameter is intended"
#: Loggers whose version is a folder: a trial's logs go to ``<out>/trials/trial_<number>``.
FOLDER_LOGGERS = (TensorBoardLogger, CSVLogger)


class _ParseOnlyCLI(DiffusionCLI):
    """The command line's parser and the namespace it makes of arguments, nothing instantiated.

    LightningCLI has no parse-only mode: ``run=False`` still seeds the process and builds the model,
    data and Trainer. This stops after parsing, so configs are checked in a fraction of a second.
    """

    @override
    def _set_seed(self) -> None:
        pass

    @override
    def before_instantiate_classes(self) -> None:
        pass

    @override
    def instantiate_classes(self) -> None:
        pass


def format_value(value: Any) -> str:
    """A value as a command-line argument the parser reads back as the same value.

    Strings are passed as they are; everything else as JSON (a YAML subset), so ``None`` is
    ``null``, booleans are ``true``/``false`` and lists stay lists.
    """
    if isinstance(value, str):
        return value
    return json.dumps(value)


def config_args(configs: Sequence[str | os.PathLike[str]], overrides: Iterable[tuple[str, Any]] = ()) -> list[str]:
    """``--config A --config B --path value ...``: the arguments of a command line."""
    args = [item for config in configs for item in ("--config", os.fspath(config))]
    for path, value in overrides:
        args += [f"--{path}", format_value(value)]
    return args


def parse_config(configs: Sequence[str | os.PathLike[str]], overrides: Iterable[tuple[str, Any]] = ()) -> Any:
    """The namespace ``diffusion-lightning fit`` makes of configs and overrides, and its parser.

    Args:
        configs: ``--config`` files, in order.
        overrides: ``(path, value)`` pairs applied after them.

    Returns:
        ``(namespace, parser)``.

    Raises:
        ValueError: With the parser's message when the arguments do not parse.
    """
    args = config_args(configs, overrides)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ARGS_WARNING)
            cli = _ParseOnlyCLI(args=args, run=False, parser_kwargs=copy.deepcopy(PARSER_KWARGS))
    except (ArgumentError, SystemExit) as error:
        raise ValueError(f"the config parser rejects {shlex.join(args)}: {error}") from error
    return cli.config, cli.parser


def check_search(configs: Sequence[str | os.PathLike[str]], space: SearchSpace) -> Any:
    """Check a search against its base config(s) with the command line's parser; no training.

    Resolves every ``fixed`` and ``params`` path (see :meth:`SearchSpace.resolve`) and parses the
    base config with ``fixed`` and the extremes of every parameter (bounds, every choice).

    Args:
        configs: The base ``--config`` files.
        space: The search (its :attr:`~SearchSpace.resolved` paths are filled in).

    Returns:
        The namespace of the base config(s) with ``fixed`` applied.

    Raises:
        ValueError: Naming the field at fault.
    """
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {os.fspath(config)!r} does not exist.")
    base, _ = parse_config(configs)
    space.resolve(base)  # fixed paths first: they may change what params can name
    fixed = [(space.full_path(p), v) for p, v in space.fixed.items()]
    try:
        namespace, _ = parse_config(configs, fixed)
    except ValueError:
        for path, value in space.fixed.items():
            _probe(configs, [], "fixed", space.full_path(path), value, space, path)
        raise
    space.resolve(base, namespace)
    params = list(space.params.values())
    for index in range(max(len(spec.probes()) for spec in params)):
        probe = [(space.full_path(s.path), s.probes()[index % len(s.probes())]) for s in params]
        try:
            parse_config(configs, [*fixed, *probe])
        except ValueError:  # find which parameter: parse them one by one
            for spec in params:
                value = spec.probes()[index % len(spec.probes())]
                _probe(configs, fixed, "params", space.full_path(spec.path), value, space, spec.path)
            raise
    return namespace


def _probe(
    configs: Sequence[str | os.PathLike[str]],
    fixed: list[tuple[str, Any]],
    section: str,
    path: str,
    value: Any,
    space: SearchSpace,
    name: str | None = None,
) -> None:
    try:
        parse_config(configs, [*fixed, (path, value)])
    except ValueError as error:
        raise ValueError(f"{space.source}: {section}.{name or path}: value {value!r} is rejected: {error}") from error


def preflight(
    configs: Sequence[str | os.PathLike[str]], space: SearchSpace, namespace: Any | None = None
) -> dict[str, float]:
    """Run the base config for one training step and one validation batch; check the metric is logged.

    No logger, checkpoints in a temporary folder, no sanity check; ``fixed`` is applied first (it
    may change what is logged). A config that does not validate at all (``limit_val_batches: 0``)
    is not made to.

    Args:
        configs: The base ``--config`` files.
        space: The search, after :func:`check_search`.
        namespace: The namespace :func:`check_search` returned (read for ``limit_val_batches``).

    Returns:
        The logged metrics (``trainer.callback_metrics`` as floats).

    Raises:
        ValueError: Naming the objective's metric and listing those that are logged.
    """
    limit_val = namespace.get("trainer.limit_val_batches") if namespace is not None else None
    metric = space.objective.metric
    with tempfile.TemporaryDirectory(prefix="tune-preflight-") as root:
        overrides = [
            *((space.full_path(p), v) for p, v in space.fixed.items()),
            ("trainer.max_steps", 1),
            ("trainer.max_epochs", 1),
            ("trainer.max_time", None),
            ("trainer.limit_train_batches", 1),
            ("trainer.limit_val_batches", 0 if limit_val == 0 else 1),
            ("trainer.val_check_interval", 1.0),
            ("trainer.check_val_every_n_epoch", 1),
            ("trainer.num_sanity_val_steps", 0),
            ("trainer.logger", False),
            ("trainer.enable_progress_bar", False),
            ("trainer.enable_model_summary", False),
            ("trainer.default_root_dir", root),
            ("checkpoint.dirpath", os.path.join(root, "checkpoints")),
        ]
        started = time.monotonic()
        try:
            trainer = run_fit(["fit", *config_args(configs, overrides)], [])
        except Exception as error:
            raise ValueError(f"{space.source}: preflight: the base config does not run: {error}") from error
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        del trainer
    log.info(
        "preflight: one step and one validation batch in %.1fs; logged %s", time.monotonic() - started, sorted(logged)
    )
    if metric not in logged:
        raise ValueError(
            f"{space.source}: objective.metric={metric!r} is never logged by the base config; "
            f"logged metrics: {sorted(logged) or 'none'}."
        )
    return logged


def run_fit(args: list[str], callbacks: list[Callback]) -> Trainer:
    """``diffusion-lightning fit`` with extra callbacks; the Trainer after ``fit`` returns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ARGS_WARNING)
        cli = DiffusionCLI(
            args=args, trainer_defaults={"callbacks": callbacks}, parser_kwargs=copy.deepcopy(PARSER_KWARGS)
        )
    return cli.trainer


class TrialObjective:
    """The function a study optimizes: one ``fit`` per trial, returning the metric's final value.

    Each trial's values and run folder are stored as user attributes (``overrides``: path as
    written -> value, ``fixed`` included; ``run_dir``; ``command``: the ``fit`` command that
    reproduces it), and a trial that raises gets its message in the ``error`` attribute before the
    study records it as failed.

    Args:
        configs: The base ``--config`` files.
        space: The search, after :func:`check_search`.
        namespace: The namespace :func:`check_search` returned (its ``trainer.logger`` is read).
        out: The study's output folder; trials run in ``<out>/trials/trial_<number>``.
    """

    def __init__(
        self, configs: Sequence[str | os.PathLike[str]], space: SearchSpace, namespace: Any, out: str | os.PathLike[str]
    ) -> None:
        self.configs = [os.fspath(c) for c in configs]
        self.space = space
        self.out = Path(out)
        self._loggers = logger_entries(namespace.get("trainer.logger"), str(self.out))

    def trial_dir(self, number: int) -> Path:
        """The run folder of trial ``number``."""
        return self.out / "trials" / f"trial_{number}"

    def fit_args(self, number: int, values: dict[str, Any]) -> list[str]:
        """The ``fit`` arguments of trial ``number`` with parameter ``values`` (by path as written)."""
        run_dir = self.trial_dir(number)
        overrides: list[tuple[str, Any]] = [(self.space.full_path(p), v) for p, v in self.space.fixed.items()]
        overrides += [(self.space.full_path(p), v) for p, v in values.items()]
        overrides += [
            ("trainer.default_root_dir", str(run_dir)),
            ("checkpoint.dirpath", str(run_dir / "checkpoints")),
        ]
        loggers = self._trial_loggers(number)
        if loggers is not None:
            overrides.append(("trainer.logger", loggers))
        return ["fit", *config_args(self.configs, overrides)]

    def _trial_loggers(self, number: int) -> Any:
        """The configured loggers, folder loggers moved to version ``trial_<number>`` of ``<out>/trials``."""
        if self._loggers is None:  # built objects, not class_path/init_args: left as configured
            return None
        if not self._loggers:
            return False
        entries = copy.deepcopy(self._loggers)
        for entry in entries:
            if issubclass(logger_class(entry["class_path"]), FOLDER_LOGGERS):
                entry["init_args"].update(save_dir=str(self.out / "trials"), name="", version=f"trial_{number}")
        return entries if len(entries) > 1 else entries[0]

    def __call__(self, trial: optuna.Trial) -> float:
        values = {path: spec.suggest(trial) for path, spec in self.space.params.items()}
        run_dir = self.trial_dir(trial.number)
        if run_dir.exists():  # left by a study of the same name in the same folder that was deleted
            stale = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("trial %d: %s exists (not from this study); moved to %s", trial.number, run_dir, stale.name)
            run_dir.rename(stale)
        args = self.fit_args(trial.number, values)
        trial.set_user_attr("overrides", {**self.space.fixed, **values})
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("command", shlex.join(["diffusion-lightning", *args]))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
        metric = self.space.objective.metric
        pruning = GlobalStepPruningCallback(trial, metric)
        try:
            trainer = self.run_fit(args, [pruning])
            pruning.check_pruned()
            value = trainer.callback_metrics.get(metric)
            if value is None:
                raise ValueError(f"{metric!r} was not logged; logged: {sorted(trainer.callback_metrics)}")
            result = float(value)
            trial.set_user_attr("global_step", int(trainer.global_step))
            if not math.isfinite(result):
                raise FloatingPointError(f"{metric}={result} at step {trainer.global_step}")
            return result
        except optuna.TrialPruned:
            raise
        except BaseException as error:  # KeyboardInterrupt too: it stops the study, and the trial says why
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:4000])
            raise
        finally:
            trainer = None  # type: ignore[assignment]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def run_fit(self, args: list[str], callbacks: list[Callback]) -> Trainer:
        """Run one trial's ``fit`` (see :func:`run_fit`); a seam for tests."""
        return run_fit(args, callbacks)
