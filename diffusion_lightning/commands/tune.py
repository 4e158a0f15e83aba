"""``diffusion-lightning tune``: an Optuna hyperparameter search over the command line's YAML configs.

Optuna is imported when the command runs, so ``fit`` and the other commands work without the
``tune`` extra installed. The options are the fields of
:class:`~diffusion_lightning.tuning.study.TuneSettings`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from diffusion_lightning.commands.common import CommandParser, add_dataclass_flags, from_args


def build_parser() -> CommandParser:
    """The ``tune`` parser: the fields of :class:`~diffusion_lightning.tuning.study.TuneSettings` (needs optuna)."""
    from diffusion_lightning.tuning.study import TuneSettings

    parser = CommandParser(
        prog="diffusion-lightning tune",
        description="Search hyperparameters of a fit config with Optuna. Every trial is a real `fit` of the base "
        "config(s) with the trial's values as command-line overrides, run in OUT/trials/trial_<n>; unpromising "
        "trials are pruned at their validations. After every trial OUT/best.yaml (ready for `fit --config`), "
        "OUT/trials.csv and plots are rewritten. Running the same command again continues the study; several "
        "processes given one database URL (postgresql://...) share it.",
        epilog="search file: objective: {metric: val/loss, direction: minimize}; params: {PATH: {type: "
        "float|int|categorical, low, high, log, step | choices}}; optional fixed: {PATH: value} and pruner: "
        "{type, ...pruner arguments}. Live view: optuna-dashboard sqlite:///OUT/study.db",
    )
    add_dataclass_flags(parser, TuneSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``tune``; returns the Optuna study."""
    try:
        import optuna

        from diffusion_lightning.tuning import TuneSettings, tune
    except ImportError as error:
        raise SystemExit(
            f"error: tune needs optuna and optuna-integration: pip install 'diffusion-lightning[tune]' ({error})"
        ) from error
    args = build_parser().parse_args(argv)
    if "matplotlib.pyplot" not in sys.modules:  # a notebook keeps its backend
        import matplotlib

        matplotlib.use("Agg")  # plots go to files; never open a window
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from tune itself
    try:
        settings = from_args(TuneSettings, args)
        study = tune(settings)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue the study", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"study {settings.study_name!r}: {len(study.trials)} trials; results in {settings.out}")
    return study
