"""Resume and fork: starting ``fit`` from a checkpoint, and what the logger makes of it.

*Resume* (``diffusion-lightning fit ... --ckpt_path last`` or ``--ckpt_path PATH``) continues the
same run. Lightning restores the weights, the optimizer and LR-scheduler state, the loop counters
and the callback states (``DiffusionModule`` adds the RNG streams); on top of that the logger keeps
the version it had when the checkpoint was written, so TensorBoard and CSV curves continue in the
same ``lightning_logs/version_N`` folder from the checkpoint's step instead of starting a new
version at step 0 (a W&B run id or a Neptune custom run id is reused the same way). A run killed
some steps after its last checkpoint had logged those steps already, and the resumed run logs them
again; a TensorBoard logger is therefore given ``purge_step`` = the checkpoint's global step (the
first step the resumed run logs; Lightning passes it to the ``SummaryWriter``), which writes a
``SessionLog.START`` event that makes TensorBoard drop the earlier events of that version from that
step on, so each step shows once. ``last`` is the newest ``last*.ckpt`` in the checkpoint folder
(``<default_root_dir>/checkpoints``); a resumed run keeps writing checkpoints into the folder of
the checkpoint it resumed.

*Fork* (``--fork_from PATH``) starts a new run from a checkpoint, usually with some changed
hyperparameters on the command line. It logs to a new version (the next free ``version_N`` of
TensorBoard and CSV loggers; other loggers draw a new run id) and writes its checkpoints to
``<default_root_dir>/checkpoints/version_N`` (``checkpoints/fork-<time>`` when the version is not
known in advance), so the parent's are never overwritten. The model is built from the fork's own
configuration (not from the hyperparameters saved in the checkpoint) and gets the parent's
weights; the global step, epoch, RNG streams and callback states continue from the checkpoint
(except ``ModelCheckpoint``'s: a fork tracks its own best checkpoints), so curves start at the
parent's step. The optimizer and LR scheduler are rebuilt from the fork's configuration: every
parameter group takes the fork's learning rate, weight decay, betas..., while the parent's moment
estimates (Adam's running averages and step counts) are kept when the optimizer class and
parameter groups are unchanged, and the fork's LR schedule is advanced to the step the parent's
had reached. So a fork that changes the learning rate trains with the new one from its first step,
and a fork with its parent's configuration trains exactly like a resume. (A schedule sized from
the Trainer, like ``WarmupCosineLR`` without ``total_steps``, takes the fork's length: a fork that
raises ``max_epochs`` stretches its cosine, a resume keeps the parent's.) Rebuilding the optimizer
goes through ``Strategy.setup_optimizers``: single-device and DDP runs; strategies that shard the
optimizer state (FSDP, DeepSpeed) are not supported.

The fork records its parent as hyperparameters ``run/parent_checkpoint``, ``run/parent_version``
and ``run/parent_step``, and in every checkpoint it writes (a resumed fork logs them again). To
continue a fork, resume it from one of its own checkpoints: ``--ckpt_path
<root>/checkpoints/version_N/last.ckpt``, or ``--config <its config.yaml> --ckpt_path last`` (the
saved config pins its version and checkpoint folder); a resume ignores ``--fork_from``.

:class:`RunLineage` (added to every ``fit`` by the command line) stores the logger versions and the
parent in checkpoints under ``checkpoint["callbacks"]["RunLineage"]``; :func:`plan_run` reads them
before the Trainer exists and says which logger versions and checkpoint folder the run needs.
With several processes every rank plans, but rank 0's plan is the one that counts: only rank 0
logs and writes checkpoints, and ``ModelCheckpoint`` broadcasts its folder.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from diffusion_lightning.utils.config import resolve_class

__all__ = [
    "RunLineage",
    "RunPlan",
    "find_last_checkpoint",
    "logger_class",
    "logger_entries",
    "plan_run",
    "read_lineage",
]

#: Where :class:`RunLineage` keeps its state in ``checkpoint["callbacks"]``.
LINEAGE_KEY = "RunLineage"
#: The logger Lightning creates when none is configured (tensorboard is a dependency).
DEFAULT_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
#: Loggers that number versions as folders, so the next version is known before the run starts.
_FOLDER_LOGGERS: tuple[type[Logger], ...] = (TensorBoardLogger, CSVLogger)


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def logger_class(class_path: str) -> type[Logger]:
    """The logger class a ``trainer.logger`` entry or a checkpoint record names (jsonargparse resolves it)."""
    return resolve_class(class_path, Logger, field="trainer.logger class_path")


def find_last_checkpoint(dirpath: str | os.PathLike[str]) -> Path | None:
    """What Lightning loads for ``ckpt_path="last"``: the newest ``last*.ckpt`` in ``dirpath``.

    The same rule as ``ModelCheckpoint._find_last_checkpoints``: a temporary file of an interrupted
    save (``.last.ckpt.<pid>-*.tmp``) is not a candidate.
    """
    folder = Path(dirpath)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if p.is_file() and p.suffix == ".ckpt" and p.name.startswith("last")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def read_lineage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The lineage recorded in a checkpoint, plus its ``global_step``.

    Returns ``{"loggers": [{"class_path", "name", "version"}, ...], "parent": {...} | None,
    "global_step": int}``; ``loggers`` is empty for a checkpoint written without :class:`RunLineage`.
    The tensors are memory-mapped, not read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    state = checkpoint.get("callbacks", {}).get(LINEAGE_KEY, {})
    return {
        "loggers": list(state.get("loggers", [])),
        "parent": state.get("parent"),
        "global_step": int(checkpoint.get("global_step", 0)),
    }


class RunLineage(Callback):
    """Record in checkpoints which logger versions wrote them and which run a fork came from.

    The state (``checkpoint["callbacks"]["RunLineage"]``) holds ``loggers`` (class path, name
    and version of each of the Trainer's loggers) and ``parent`` (``checkpoint``, ``global_step``,
    ``loggers`` and ``parent`` of the run this one forked from, or ``None``). When forking (see
    the module documentation) it also logs the parent as hyperparameters ``run/parent_*`` and
    rebuilds the optimizers and LR schedulers from the fork's configuration after Lightning has
    restored the parent's; Lightning offers no option to restore a checkpoint's weights and loop
    counters without its optimizer hyperparameters, hence this callback.

    Args:
        fork_from: The checkpoint this run forks from; ``fit`` must be given the same file as
            ``ckpt_path``. ``None`` for a new or resumed run.
    """

    def __init__(self, fork_from: str | None = None) -> None:
        self.fork_from = None if fork_from is None else os.fspath(fork_from)
        self.parent: dict[str, Any] | None = None
        self._forking = False
        self._parent_logged = False
        self._loggers: list[Logger] = []

    @property
    @override
    def state_key(self) -> str:
        return LINEAGE_KEY

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loggers = list(trainer.loggers)
        self._parent_logged = False

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        self._forking = self.fork_from is not None and trainer.state.fn == "fit"
        if not self._forking:
            self.parent = state.get("parent")
            return
        fork_from = self.fork_from
        assert fork_from is not None
        if trainer.ckpt_path is None or not _same_file(trainer.ckpt_path, fork_from):
            raise ValueError(
                f"fork_from={fork_from!r} differs from the checkpoint fit restores ({trainer.ckpt_path!r}); "
                "pass the same file as ckpt_path."
            )
        # A fork tracks its own best checkpoints, in its own folder: forget the parent's.
        for callback in trainer.checkpoint_callbacks:
            checkpoint.get("callbacks", {}).pop(callback.state_key, None)
        self.parent = {
            "checkpoint": os.path.abspath(fork_from),
            "global_step": int(checkpoint.get("global_step", 0)),
            "loggers": list(state.get("loggers", [])),
            "parent": state.get("parent"),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        records = [{"class_path": _class_path(lg), "name": lg.name, "version": lg.version} for lg in self._loggers]
        return {"loggers": records, "parent": self.parent}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning logs the model's hyperparameters and writes TensorBoard's hparams.yaml.
        if self.parent is not None:
            self._log_parent(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fork_from is not None and not self._forking and self.parent is None:
            raise ValueError(f"fork_from={self.fork_from!r} forks only when fit is given it as ckpt_path.")
        if self.parent is not None and not self._parent_logged:  # strategies that restore after setup
            self._log_parent(trainer)
        if self._forking:
            _rebuild_optimizers(trainer)
            self._forking = False

    def _log_parent(self, trainer: pl.Trainer) -> None:
        assert self.parent is not None
        parent_loggers = self.parent.get("loggers") or [{}]
        lineage = {
            "run": {
                "parent_checkpoint": self.parent["checkpoint"],
                "parent_version": parent_loggers[0].get("version"),
                "parent_step": self.parent["global_step"],
            }
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(lineage)
        self._parent_logged = True


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Optimizers and schedulers from the current configuration, with the restored moments and position."""
    restored_optimizers = list(trainer.optimizers)
    restored_schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for fresh, parent in zip(trainer.optimizers, restored_optimizers):
        if type(fresh) is not type(parent) or len(fresh.param_groups) != len(parent.param_groups):
            rank_zero_warn(
                f"The fork's optimizer ({type(fresh).__name__}, {len(fresh.param_groups)} groups) differs from the "
                f"parent's ({type(parent).__name__}, {len(parent.param_groups)} groups); it starts without moments."
            )
            continue
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in fresh.param_groups]
        fresh.load_state_dict(parent.state_dict())
        for group, values in zip(fresh.param_groups, hyperparameters):
            group.update(values)
    for config, parent_scheduler in zip(trainer.lr_scheduler_configs, restored_schedulers):
        scheduler = config.scheduler
        if config.reduce_on_plateau or isinstance(scheduler, ReduceLROnPlateau):
            scheduler.load_state_dict(parent_scheduler.state_dict())  # driven by metrics: keep its counters
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            while scheduler.last_epoch < getattr(parent_scheduler, "last_epoch", 0):
                scheduler.step()


# ---------------------------------------------------------------------- before the Trainer exists


@dataclass
class RunPlan:
    """How a ``fit`` starts, decided from its configuration before anything is instantiated."""

    mode: str
    """``fresh``, ``resume`` or ``fork``."""
    checkpoint: Path | None = None
    """The checkpoint resumed or forked (``None`` when fresh or when ``last`` does not exist yet)."""
    lineage: dict[str, Any] | None = None
    """:func:`read_lineage` of that checkpoint."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Configuration values to set: ``{"trainer": {"logger": ...}, "checkpoint": {"dirpath": ...}}``."""


def logger_entries(value: Any, root: str) -> list[dict[str, Any]] | None:
    """The configured loggers as ``class_path``/``init_args`` dicts; ``None`` when they cannot be edited."""
    if value is False:
        return []
    if value is None or value is True:
        return [{"class_path": DEFAULT_LOGGER, "init_args": {"save_dir": root}}]
    entries = []
    for item in value if isinstance(value, list) else [value]:
        if not (hasattr(item, "get") and item.get("class_path")):
            return None  # an already built logger: nothing to configure
        init_args = item.get("init_args")
        init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
        entries.append({"class_path": item["class_path"], "init_args": init_args})
    return entries


def _accepts_version(cls: type) -> bool:
    return "version" in inspect.signature(cls).parameters


def _resume_versions(entries: list[dict[str, Any]], recorded: list[dict[str, Any]], step: int) -> bool:
    """Point the loggers at the versions that wrote the checkpoint; TensorBoard's purge what follows ``step``."""
    changed = False
    for entry, record in zip(entries, recorded):
        cls = logger_class(entry["class_path"])
        if cls is not logger_class(record["class_path"]) or not _accepts_version(cls):
            rank_zero_info(f"Resuming: {entry['class_path']} starts a new version (the checkpoint's logger differs).")
            continue
        if entry["init_args"].get("version") is None and record.get("version") is not None:
            entry["init_args"]["version"] = record["version"]
            changed = True
        if issubclass(cls, TensorBoardLogger) and entry["init_args"].get("version") == record.get("version"):
            # What the interrupted run logged after its checkpoint is logged again by the resumed run: the
            # SummaryWriter's purge_step hides the earlier copy (a stale value from a saved config is replaced).
            entry["init_args"]["purge_step"] = step
            changed = True
    return changed


def _fork_versions(entries: list[dict[str, Any]], recorded: list[dict[str, Any]]) -> str | None:
    """Pin the next free version of folder loggers; the folder name of the first one."""
    name = None
    for index, entry in enumerate(entries):
        cls = logger_class(entry["class_path"])
        version = entry["init_args"].get("version")
        parent = recorded[index] if index < len(recorded) else {}
        if version is not None and parent.get("version") == version and logger_class(parent["class_path"]) is cls:
            raise ValueError(
                f"trainer.logger version={version!r} is the parent's; a fork logs to a new version "
                "(leave version unset, or resume with --ckpt_path instead)."
            )
        if version is None and issubclass(cls, _FOLDER_LOGGERS):
            version = cls(**entry["init_args"]).version  # lists the version folders, creates nothing
            entry["init_args"]["version"] = version
        if name is None and version is not None:
            name = version if isinstance(version, str) else f"version_{version}"
    return name


def plan_run(config: Any, root: str) -> RunPlan:
    """Decide how a ``fit`` configuration starts: fresh, resumed, or forked.

    Args:
        config: The ``fit`` configuration (``ckpt_path``, ``fork_from``, ``trainer.logger`` and
            ``checkpoint.dirpath`` are read; a jsonargparse namespace or anything with ``get``).
        root: ``trainer.default_root_dir`` (or the working directory).

    Returns:
        The plan; its ``overrides`` pin the logger versions and the checkpoint folder.
    """
    ckpt_path, fork_from = config.get("ckpt_path"), config.get("fork_from")
    dirpath = config.get("checkpoint", {}).get("dirpath")
    default_dir = dirpath or os.path.join(root, "checkpoints")
    logger_value = config.get("trainer", {}).get("logger")

    if ckpt_path is not None:
        if fork_from is not None:
            rank_zero_info(f"Resuming from {ckpt_path!r}: fork_from is ignored (the checkpoint names its parent).")
        path = find_last_checkpoint(default_dir) if ckpt_path == "last" else Path(ckpt_path)
        plan = RunPlan("resume")
        if dirpath is None:
            folder = path.parent if ckpt_path != "last" and path is not None and path.is_file() else default_dir
            plan.overrides["checkpoint"] = {"dirpath": str(folder)}
        if path is None or not path.is_file():
            return plan  # "last" before any checkpoint exists, or "best"/"hpc"/...: Lightning decides
        lineage = read_lineage(path)
        plan.checkpoint, plan.lineage = path, lineage
        entries = logger_entries(logger_value, root)
        if not lineage["loggers"]:
            rank_zero_warn(f"{str(path)!r} does not record its logger version; the logger starts a new version.")
        elif entries and _resume_versions(entries, lineage["loggers"], lineage["global_step"]):
            plan.overrides["trainer"] = {"logger": entries if isinstance(logger_value, list) else entries[0]}
        return plan

    if fork_from is None:
        return RunPlan("fresh", overrides={} if dirpath else {"checkpoint": {"dirpath": default_dir}})

    path = Path(fork_from)
    if not path.is_file():
        raise FileNotFoundError(f"fork_from={fork_from!r} does not exist.")
    lineage = read_lineage(path)
    plan = RunPlan("fork", checkpoint=path, lineage=lineage)
    entries = logger_entries(logger_value, root)
    if entries == [] and dirpath is None:
        raise ValueError(
            "fork_from needs a logger to name the new version (trainer.logger=False); "
            "enable one or give --checkpoint.dirpath for the fork's checkpoints."
        )
    name = _fork_versions(entries, lineage["loggers"]) if entries else None
    if entries:
        plan.overrides["trainer"] = {"logger": entries if isinstance(logger_value, list) else entries[0]}
    if dirpath is None:
        name = name or time.strftime("fork-%Y%m%d-%H%M%S")
        plan.overrides["checkpoint"] = {"dirpath": os.path.join(default_dir, name)}
    return plan
