"""``diffusion-lightning``: LightningCLI for training plus commands for sampling and export.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands configured by YAML
(``--config configs/X.yaml``, any value overridable as ``--model.learning_rate 3e-4``). The other
commands work on what training leaves behind (checkpoints and exported pipelines) and are
dispatched before LightningCLI parses anything, so they never build a Trainer.
"""

from __future__ import annotations

import os
import sys
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.optim import Optimizer
from typing_extensions import override

from diffusion_lightning.callbacks.checkpoint import BestAndLastCheckpoint
from diffusion_lightning.errors import (
    OneLineErrors,
    close_match,
    one_line,
    pop_traceback_flag,
    report,
    traceback_requested,
    user_error,
)
from diffusion_lightning.loggers.runs import RunLineage, RunPlan, plan_run
from diffusion_lightning.utils.checkpoint_io import AtomicCheckpointIO
from diffusion_lightning.utils.config import resolve_class

#: Data-module attributes copied into the model's arguments so a config names them once.
DATA_TO_MODEL_LINKS: tuple[str, ...] = ("num_classes", "image_size", "in_channels", "class_names")


def _extra_commands() -> dict[str, tuple[str, Callable[[Sequence[str]], Any]]]:
    from diffusion_lightning import app
    from diffusion_lightning.commands import analyze, evaluate, export, sample, tune

    return {
        "analyze": ("Compare students with their teacher: MSE, trajectories, denoising, time.", analyze.main),
        "evaluate": ("Score samples (judge, FID/KID, precision/recall, LPIPS, CLIP) into eval/.", evaluate.main),
        "sample": ("Generate a labelled grid and per-image PNGs from a checkpoint or pipeline.", sample.main),
        "export": ("Write a diffusers pipeline folder from a checkpoint.", export.main),
        "tune": ("Optuna hyperparameter search over a fit config (trials are real fits).", tune.main),
        "app": ("Local web app: generate images, browse runs, start and stop training.", app.main),
    }


class DiffusionCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - any ``LightningModule`` (the diffusion modules, the digit classifier) as ``model`` and any
      ``LightningDataModule`` as ``data`` (``class_path``/``init_args``);
    - the data module's ``num_classes``, ``image_size``, ``in_channels`` and ``class_names`` are
      linked to the model's arguments of the same name;
    - a ``checkpoint`` group configures one ``ModelCheckpoint``
      (:class:`~diffusion_lightning.callbacks.checkpoint.BestAndLastCheckpoint`) that keeps the best (lowest
      ``val/loss``) and the last checkpoint in ``<default_root_dir>/checkpoints``, so
      ``--ckpt_path last`` finds the last one of an earlier run; checkpoints are written beside
      their target and renamed into place (:class:`~diffusion_lightning.utils.checkpoint_io.AtomicCheckpointIO`)
      unless ``trainer.plugins`` configures a checkpoint IO, so a kill never truncates one;
    - TensorBoard is the default logger (Lightning's default when tensorboard is installed);
    - ``fit --ckpt_path last|PATH`` resumes a run in the logger version that wrote the checkpoint,
      and ``fit --fork_from PATH`` forks a new version from a checkpoint (see
      :mod:`diffusion_lightning.loggers.runs`); a :class:`RunLineage` callback records logger
      versions and parents in every checkpoint;
    - the top-level ``--optimizer`` and ``--lr_scheduler`` of LightningCLI apply only to a model
      without its own ``configure_optimizers``. The package's modules build their optimizer from
      their parameter groups and ``learning_rate``, configured by ``--model.init_args.optimizer``
      and ``--model.init_args.lr_scheduler``; given for such a model, or ``--lr_scheduler``
      without ``--optimizer`` (which LightningCLI would ignore), they are a parser error that says so.
    """

    #: LightningCLI's top-level optimization groups and their titles in ``--help``.
    TOP_LEVEL_OPTIMIZATION = {
        "optimizer": "top-level optimizer (models without configure_optimizers only)",
        "lr_scheduler": "top-level LR scheduler (with --optimizer, models without configure_optimizers only)",
    }
    TOP_LEVEL_NOTE = (
        "The package's modules configure their own optimizer: use --model.init_args.optimizer and\n"
        "--model.init_args.lr_scheduler (e.g. lightning.pytorch.cli.ReduceLROnPlateau with monitor: val/loss)."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "Train and evaluate diffusion models.")
        parser_kwargs.setdefault("epilog", _epilog())
        parser_kwargs.setdefault("formatter_class", _HelpFormatter)
        self.run_plan: RunPlan | None = None
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self.auto_configure_optimizers:  # LightningCLI's own groups, titled with what they apply to
            parser.add_optimizer_args((Optimizer,))
            parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
            for key, title in self.TOP_LEVEL_OPTIMIZATION.items():
                group = getattr(parser, "groups", {}).get(key)
                if group is not None:
                    group.title, group.description = title, self.TOP_LEVEL_NOTE
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}-{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        for name in DATA_TO_MODEL_LINKS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--fork_from",
            type=str | None,
            default=None,
            help="fit only: start a new logger version from this checkpoint's weights and step, with the "
            "hyperparameters of this command line (see diffusion_lightning.loggers.runs).",
        )

    @override
    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config is not None:
            self._check_top_level_optimization(config)
        if config is None or "checkpoint" not in config:
            return
        root = config.trainer.default_root_dir or os.getcwd()
        if subcommand == "fit":
            config = self._plan_fit(config, root)
        elif config.get("fork_from") is not None:
            raise ValueError(f"fork_from={config.fork_from!r} applies to fit only, not to {subcommand}.")
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        # Like the callbacks of trainer_defaults, always present: every checkpoint records its lineage.
        callbacks = self.trainer_defaults.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        extra: list[Any] = [RunLineage(self._fork_from())]
        if subcommand == "predict" and not _configures(config, "PredictionWriter"):
            from diffusion_lightning.callbacks.predictions import PredictionWriter

            extra.append(PredictionWriter())  # predict writes what it generates unless the config says where
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*callbacks, *extra]}

    def _plan_fit(self, config: Any, root: str) -> Any:
        """Resume or fork: pin the logger versions and the checkpoint folder (see ``loggers.runs``)."""
        self.run_plan = plan = plan_run(config, root)
        if "trainer" in plan.overrides:  # re-parsed, so the saved config.yaml names the logger and its version
            self.config = self.parser.parse_object({"fit": {"trainer": plan.overrides["trainer"]}}, self.config)
            config = self.config.fit
        if "checkpoint" in plan.overrides:
            config.checkpoint.dirpath = plan.overrides["checkpoint"]["dirpath"]
        return config

    def _check_top_level_optimization(self, config: Any) -> None:
        """Refuse a top-level ``--optimizer``/``--lr_scheduler`` that LightningCLI would ignore or misapply."""
        given = [key for key in self.TOP_LEVEL_OPTIMIZATION if config.get(key) is not None]
        if not given:
            return
        flags = " and ".join(f"--{key}" for key in given)
        model = config.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        model_class = type(model) if isinstance(model, LightningModule) else None
        if isinstance(class_path, str):
            model_class = resolve_class(class_path, LightningModule, "model.class_path")
        if model_class is not None and model_class.configure_optimizers is not LightningModule.configure_optimizers:
            name = f"{model_class.__module__}.{model_class.__qualname__}"
            instead = " and ".join(f"--model.init_args.{key}" for key in given)
            self.parser.error(
                f"{flags} (top level) cannot apply to {name}, which builds its optimizer itself from its parameter "
                f"groups and learning_rate; set {instead} instead, e.g. --model.init_args.lr_scheduler "
                "'{class_path: lightning.pytorch.cli.ReduceLROnPlateau, init_args: {monitor: val/loss}}'."
            )
        if given == ["lr_scheduler"]:
            self.parser.error(
                "--lr_scheduler (top level) takes effect only together with --optimizer; give both, or configure "
                "the model's own lr_scheduler argument."
            )

    def _fork_from(self) -> str | None:
        plan = self.run_plan
        return str(plan.checkpoint) if plan is not None and plan.mode == "fork" else None

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, saving checkpoints atomically beside their target unless a checkpoint IO is configured."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """``trainer.fit``; a fork restores its checkpoint as ``ckpt_path`` (LightningCLI calls this)."""
        fork_from = self._fork_from()
        if fork_from is not None:
            kwargs["ckpt_path"] = fork_from
        self.trainer.fit(model, **kwargs)


def _configures(config: Any, class_name: str) -> bool:
    """Whether the parsed config's ``trainer.callbacks`` has a callback of that class name."""
    callbacks = config.trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(str(getattr(c, "class_path", "") or type(c).__name__).endswith(class_name) for c in callbacks)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help formatter that keeps the epilog's lines (one extra command per line)."""


def _epilog() -> str:
    lines = ["other commands (run with --help for their options):"]
    lines += [f"  {name:<10} {text}" for name, (text, _) in _extra_commands().items()]
    lines += ["", "--traceback (anywhere, any command) or DIFFUSION_LIGHTNING_TRACEBACK=1: print the traceback of an",
              "error in the input too (it is otherwise one 'error:' line, exit code 2)."]  # fmt: skip
    return "\n".join(lines)


#: ``ckpt_path`` values that Lightning resolves itself rather than reading a file of that name.
_NAMED_CKPT_PATHS = ("last", "best", "hpc", "registry")


class _CLIParser(OneLineErrors, LightningArgumentParser):
    """The parser of ``fit``, ``validate``, ``test`` and ``predict`` that :func:`main` gives LightningCLI.

    A mistake is one ``error:`` line (see :class:`~diffusion_lightning.errors.OneLineErrors`); a
    ``--config`` file that is not valid YAML is named in it. Once parsed, a ``ckpt_path`` that names
    a local file is read (its tensors mapped, not loaded), so a missing, truncated or foreign
    checkpoint is reported naming the file before anything is built.
    """

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        """LightningArgumentParser's ``parse_args``, then the ``ckpt_path`` check."""
        self._arguments = list(sys.argv[1:] if args is None else args)
        config = super().parse_args(args, *rest, **kwargs)
        subcommand = config.get("subcommand")
        ckpt_path = config.get(f"{subcommand}.ckpt_path") if subcommand else None
        if isinstance(ckpt_path, str) and not _named_or_remote(ckpt_path):
            from diffusion_lightning.modules.loading import read_checkpoint

            try:
                read_checkpoint(ckpt_path, mmap=True)
            except (ValueError, FileNotFoundError) as error:
                self.error(str(error), error)
        return config

    def one_line_error(self, message: str) -> str:
        """``message`` on one line; a config that does not parse as YAML is named."""
        if message.startswith("Problems parsing config"):
            broken = _broken_yaml(getattr(self, "_arguments", None) or sys.argv[1:])
            if broken is not None:
                return broken
        return super().one_line_error(message)

    def error_hint(self, message: str) -> str | None:
        """The closest known option; for an unknown argument of a class, where its arguments are listed."""
        hint = super().error_hint(message)
        if hint is None and "Option '" in message and "' is not accepted" in message:
            return "fit --model.help CLASS (or --data.help CLASS) lists the init_args a class accepts."
        return hint


def _named_or_remote(ckpt_path: str) -> bool:
    """Whether Lightning resolves ``ckpt_path`` itself (``last``, ``registry:...``) or reads it remotely (a URL)."""
    return ckpt_path in _NAMED_CKPT_PATHS or ckpt_path.startswith("registry:") or "://" in ckpt_path


def _broken_yaml(argv: Sequence[str]) -> str | None:
    """The message for the first ``--config`` file of ``argv`` that is not valid YAML, if any is not."""
    import yaml

    given = [value for flag, value in zip(argv, argv[1:]) if flag in ("-c", "--config")]
    given += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for value in given:
        if not os.path.isfile(value):
            continue
        try:
            with open(value) as file:
                yaml.safe_load(file)
        except yaml.YAMLError as error:
            return f"config {value!r} is not valid YAML ({one_line(error)})."
    return None


def _check_command(argv: Sequence[str], extra: Sequence[str]) -> None:
    """Refuse no arguments, or a first one that is a word but no command, naming the commands (and the closest one)."""
    commands = [*DiffusionCLI.subcommands(), *extra]
    if not argv:
        raise SystemExit(f"error: no command given; expected one of: {', '.join(commands)} (or --help).")
    if argv[0].startswith("-"):
        return
    if argv[0] not in commands:
        close = close_match(argv[0], commands)
        hint = f"\nhint: did you mean {close!r}?" if close else ""
        raise SystemExit(f"error: unknown command {argv[0]!r}; expected one of: {', '.join(commands)}.{hint}")


def _dispatch(argv: list[str], from_sys_argv: bool) -> None:
    """Run the command of ``argv``: an extra command, or LightningCLI (which reads ``sys.argv`` when so asked)."""
    extra = _extra_commands()
    if argv and argv[0] in extra:
        extra[argv[0]][1](argv[1:])
        return
    _check_command(argv, list(extra))
    DiffusionCLI(args=None if from_sys_argv else argv, parser_class=_CLIParser)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``diffusion-lightning`` and ``python -m diffusion_lightning``.

    A mistake in the input (a flag, a value, a config key, a file; the rule is in
    :mod:`diffusion_lightning.errors`) ends the command with one ``error:`` line on stderr, at most
    one ``hint:`` line, and exit code 2, raised as a ``SystemExit`` whose ``str()`` is that text.
    ``--traceback``, anywhere among the arguments, or ``DIFFUSION_LIGHTNING_TRACEBACK=1`` prints its
    traceback first. Any other failure is a bug and raises as it is, with its traceback.

    Args:
        args: The arguments; ``None`` reads ``sys.argv`` (from which ``--traceback`` is then removed).
    """
    argv, show_traceback = pop_traceback_flag(sys.argv[1:] if args is None else args)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI (and DDP's relaunch of this command) read sys.argv
    try:
        _dispatch(argv, from_sys_argv=args is None)
    except BaseException as error:
        found = user_error(error)
        if found is None:
            raise
        raise report(found, error, show_traceback or traceback_requested()) from error


if __name__ == "__main__":
    main()
