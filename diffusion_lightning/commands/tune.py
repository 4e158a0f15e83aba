"""``diffusion-lightning tune``: an Optuna hyperparameter search over the command line's YAML configs.

Optuna is imported when the command runs, so ``fit`` and the other commands work without the
``tune`` extra installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "hyperband", "none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    parser.add_argument(
        "--config", "-c", action="append", required=True, metavar="YAML",
        help="base fit config; repeat to layer several, as with fit",
    )  # fmt: skip
    parser.add_argument("--search", required=True, metavar="YAML", help="search file (see below)")
    parser.add_argument(
        "--n-trials", "--n_trials", dest="n_trials", type=int, required=True,
        help="the number of finished trials (complete, pruned or failed) the study should hold; "
        "re-running counts those already there",
    )  # fmt: skip
    parser.add_argument(
        "--study-name", "--study_name", dest="study_name", help="default: the search file's name without .yaml"
    )
    parser.add_argument(
        "--storage", help="SQLAlchemy URL of the study database (default: sqlite:///OUT/study.db; one worker per "
        "SQLite file, a server such as postgresql://user@host/db for many)",
    )  # fmt: skip
    parser.add_argument("--out", help="output folder (default: outputs/tune/STUDY_NAME)")
    parser.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="(default: %(default)s)")
    parser.add_argument("--pruner", choices=PRUNERS, help="default: the search file's pruner.type, else median")
    parser.add_argument("--seed", type=int, help="seed of the sampler (give each worker its own)")
    parser.add_argument(
        "--heartbeat", type=int, default=60, metavar="SECONDS",
        help="heartbeat of running trials; a trial silent for twice this is failed (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-preflight", "--skip_preflight", dest="preflight", action="store_false",
        help="skip the one-step run that checks the objective's metric is logged",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``tune``; returns the Optuna study."""
    args = build_parser().parse_args(argv)
    if "matplotlib.pyplot" not in sys.modules:  # a notebook keeps its backend
        import matplotlib

        matplotlib.use("Agg")  # plots go to files; never open a window
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import optuna

        from diffusion_lightning.tuning import TuneSettings, tune
    except ImportError as error:
        raise SystemExit(
            f"error: tune needs optuna and optuna-integration: pip install 'diffusion-lightning[tune]' ({error})"
        ) from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from tune itself
    try:
        settings = TuneSettings(
            configs=args.config,
            search=args.search,
            n_trials=args.n_trials,
            study_name=args.study_name,
            storage=args.storage,
            out=args.out,
            timeout=args.timeout,
            sampler=args.sampler,
            pruner=args.pruner,
            seed=args.seed,
            heartbeat_interval=args.heartbeat,
            preflight=args.preflight,
        )
        study = tune(settings)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue the study", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"study {settings.study_name!r}: {len(study.trials)} trials; results in {settings.out}")
    return study
