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
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from diffusion_lightning.loggers.runs import RunLineage, RunPlan, plan_run

#: Data-module attributes copied into the model's arguments so a config names them once.
DATA_TO_MODEL_LINKS: tuple[str, ...] = ("num_classes", "image_size", "in_channels", "class_names")


def _extra_commands() -> dict[str, tuple[str, Callable[[Sequence[str]], Any]]]:
    from diffusion_lightning.commands import analyze, evaluate, export, sample, tune

    return {
        "analyze": ("Compare students with their teacher: MSE, trajectories, denoising, time.", analyze.main),
        "evaluate": ("Score samples (judge, FID/KID, precision/recall, LPIPS, CLIP) into eval/.", evaluate.main),
        "sample": ("Generate a labelled grid and per-image PNGs from a checkpoint or pipeline.", sample.main),
        "export": ("Write a diffusers pipeline folder from a checkpoint.", export.main),
        "tune": ("Optuna hyperparameter search over a fit config (trials are real fits).", tune.main),
    }


class DiffusionCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - any ``LightningModule`` (the diffusion modules, the digit classifier) as ``model`` and any
      ``LightningDataModule`` as ``data`` (``class_path``/``init_args``);
    - the data module's ``num_classes``, ``image_size``, ``in_channels`` and ``class_names`` are
      linked to the model's arguments of the same name;
    - a ``checkpoint`` group configures one ``ModelCheckpoint`` that keeps the best (lowest
      ``val/loss``) and the last checkpoint in ``<default_root_dir>/checkpoints``, so
      ``--ckpt_path last`` finds the last one of an earlier run;
    - TensorBoard is the default logger (Lightning's default when tensorboard is installed);
    - ``fit --ckpt_path last|PATH`` resumes a run in the logger version that wrote the checkpoint,
      and ``fit --fork_from PATH`` forks a new version from a checkpoint (see
      :mod:`diffusion_lightning.loggers.runs`); a :class:`RunLineage` callback records logger
      versions and parents in every checkpoint.
    """

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
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

    def _fork_from(self) -> str | None:
        plan = self.run_plan
        return str(plan.checkpoint) if plan is not None and plan.mode == "fork" else None

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
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``diffusion-lightning`` and ``python -m diffusion_lightning``."""
    argv = list(sys.argv[1:] if args is None else args)
    extra = _extra_commands()
    if argv and argv[0] in extra:
        extra[argv[0]][1](argv[1:])
        return
    DiffusionCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
