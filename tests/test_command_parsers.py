"""The command parsers: built from config dataclasses, one flag rule, one-line errors naming what is accepted."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from diffusion_lightning.cli import main
from diffusion_lightning.commands import analyze, evaluate, export, sample, tune
from diffusion_lightning.commands.common import CommandParser, SamplingOptions, add_dataclass_flags, from_args
from diffusion_lightning.metrics.config import EvaluationConfig


@dataclass
class Toy:
    """A dataclass with one field of each kind the builder handles.

    Args:
        path: A required path.
        mode: How to run.
    """

    path: str
    mode: Literal["fast", "slow"] = "fast"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    """Sizes to try."""
    label: str | None = field(default=None, metadata={"flags": ("-l",), "metavar": "NAME"})
    """A name for the run."""
    verbose: bool = False
    """Print more."""
    progress: bool = True
    """Show progress bars."""


def toy_parser() -> CommandParser:
    parser = CommandParser(prog="toy")
    add_dataclass_flags(parser, Toy)
    return parser


def tune_available() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def underscored_flags(argv: list[str]) -> list[str]:
    """``argv`` with every ``--flag-name`` spelled ``--flag_name``."""
    return ["--" + arg[2:].replace("-", "_") if arg.startswith("--") else arg for arg in argv]


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """The message of the ``SystemExit`` that parsing ``argv`` raises."""
    with pytest.raises(SystemExit) as error:
        parser.parse_args(argv)
    return str(error.value)


def test_the_builder_derives_flags_types_defaults_and_help_from_the_dataclass(capsys):
    parser = toy_parser()
    args = parser.parse_args(["--path", "p", "--mode", "slow", "--sizes", "3", "4", "-l", "x", "--verbose"])
    assert from_args(Toy, args, progress=False) == Toy("p", "slow", [3, 4], "x", True, False)
    assert from_args(Toy, parser.parse_args(["--path", "p", "--no-progress"])) == Toy("p", progress=False)
    assert parser.parse_args(["--path=p", "--label", "y"]).label == "y"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for text in ("A required path.", "How to run.", "Sizes to try.", "A name for the run.", "Print more.", "-l NAME"):
        assert text in out
    assert "Show progress bars. On unless this flag is given." in " ".join(out.split())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--path", "p", "--mode", "quick"], "error: --mode 'quick' is not accepted; expected one of: fast, slow."),
        (["--path", "p", "--sizes", "1", "x"], "error: --sizes 'x' is not accepted; expected an int."),
        (["--mode", "fast"], "error: the following arguments are required: --path"),
        (["--path", "p", "--colour", "red"], "error: unrecognized arguments: --colour red"),
    ],
)
def test_mistakes_are_one_line_naming_the_flag_the_value_and_what_is_accepted(argv, message):
    assert parse_error(toy_parser(), argv) == message


def command_parsers() -> list[argparse.ArgumentParser]:
    parsers = [evaluate.build_parser(), sample.build_parser(), analyze.build_parser(), export.build_parser()]
    return [*parsers, tune.build_parser()] if tune_available() else parsers


def test_both_spellings_of_every_flag_are_the_same_flag():
    for parser in command_parsers():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            name = ("no_" if isinstance(action, argparse._StoreFalseAction) else "") + action.dest
            assert {"--" + name.replace("_", "-"), "--" + name} <= set(action.option_strings), parser.prog


def test_every_option_is_documented():
    for parser in command_parsers():
        undocumented = [action.dest for action in parser._actions if not (action.help or "").strip()]
        assert not undocumented, (parser.prog, undocumented)


# ---------------------------------------------------------------------- evaluate


def test_evaluate_bad_choice_is_one_line_with_the_accepted_values(capsys):
    with pytest.raises(SystemExit) as error:
        main(["evaluate", "--real", "test", "--feature-extractor", "nope"])
    message = str(error.value)
    assert message == "error: --feature-extractor 'nope' is not accepted; expected one of: auto, digits, inception."
    assert capsys.readouterr().err == message + "\n"  # no usage block: the one line is all
    message = parse_error(evaluate.build_parser(), ["--real", "test", "--metrics", "judge", "nope"])
    assert message.startswith("error: --metrics 'nope' is not accepted; expected one of: judge, fid, kid")
    message = parse_error(evaluate.build_parser(), ["--real", "test", "--logger", "mlflow"])
    assert (
        message == "error: --logger 'mlflow' is not accepted; expected one of: tensorboard, csv, wandb, neptune, none."
    )


def test_export_flags_come_from_its_dataclass_and_mistakes_are_one_line():
    parser = export.build_parser()
    assert parse_error(parser, ["--ckpt", "a.ckpt", "--out", "b", "--weights", "best"]) == (
        "error: --weights 'best' is not accepted; expected one of: ema, raw."
    )
    assert "--out" in parse_error(parser, ["--ckpt", "a.ckpt"])  # required
    dashed = ["--ckpt-path", "a.ckpt", "--out", "b", "--merge-lora"]
    for argv in (dashed, underscored_flags(dashed)):
        args = parser.parse_args(argv)
        parsed = (args.ckpt, args.out, args.merge_lora, args.overwrite, args.weights)
        assert parsed == ("a.ckpt", "b", True, False, "ema")


def test_evaluate_source_is_exactly_one_of_ckpt_pipeline_real():
    assert "one of the arguments --ckpt" in parse_error(evaluate.build_parser(), ["--n-samples", "5"])
    assert "not allowed with" in parse_error(evaluate.build_parser(), ["--ckpt", "a", "--pipeline", "b"])
    assert parse_error(evaluate.build_parser(), ["--real", "test", "--n-samples", "five"]) == (
        "error: --n-samples 'five' is not accepted; expected an int."
    )


def test_evaluate_spellings_parse_to_the_same_config():
    dashed = ["--real", "test", "--n-samples", "7", "--batch-size", "3", "--feature-extractor", "digits"]
    dashed += ["--num-inference-steps", "4", "--guidance-scale", "1.5", "--no-progress", "--allow-random-lpips"]
    dashed += ["--reference-split", "val", "--num-worst", "2", "--metrics", "judge", "fid", "--scheduler", "ddim"]
    underscored = underscored_flags(dashed)
    short = [arg if arg != "--num-inference-steps" else "--steps" for arg in dashed]
    configs = [from_args(EvaluationConfig, evaluate.build_parser().parse_args(argv)) for argv in (dashed, underscored)]
    configs.append(from_args(EvaluationConfig, evaluate.build_parser().parse_args(short)))
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].n_samples == 7 and configs[0].num_inference_steps == 4 and configs[0].metrics == ["judge", "fid"]
    assert configs[0].feature_extractor == "digits" and not configs[0].progress and configs[0].allow_random_lpips
    defaults = from_args(EvaluationConfig, evaluate.build_parser().parse_args(["--real", "test"]))
    assert defaults == EvaluationConfig()  # the parser's defaults are the dataclass's
    for flag in ("--ckpt", "--ckpt-path", "--ckpt_path"):
        assert evaluate.build_parser().parse_args([flag, "x.ckpt"]).ckpt == "x.ckpt"


# ---------------------------------------------------------------------- sample


def test_sample_bad_choice_is_one_line_with_the_accepted_values():
    with pytest.raises(SystemExit) as error:
        main(["sample", "--pipeline", "p", "--scheduler", "nope"])
    assert str(error.value) == (
        "error: --scheduler 'nope' is not accepted; expected one of: ddim, ddpm, dpm, euler, euler_a, heun, unipc."
    )
    assert parse_error(sample.build_parser(), ["--ckpt", "c", "--weights", "best"]) == (
        "error: --weights 'best' is not accepted; expected one of: ema, raw."
    )


def test_sample_spellings_parse_to_the_same_options():
    dashed = ["--pipeline", "p", "--n-per-class", "2", "--batch-size", "1", "--no-images", "--classes", "1", "7"]
    dashed += ["--num-inference-steps", "3", "--guidance-scale", "2", "--negative-prompt", "a", "b"]
    dashed += ["--prompt", "a cat", "7", "--attention-slicing", "--vae-slicing", "--vae-tiling", "--cpu-offload"]
    underscored = underscored_flags(dashed)
    legacy = [{"--n-per-class": "--n-per-prompt", "--num-inference-steps": "--steps"}.get(a, a) for a in dashed]
    parsed = [sample.build_parser().parse_args(argv) for argv in (dashed, underscored, legacy)]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0].n_per_class == 2 and parsed[0].classes == [1, 7] and not parsed[0].images
    assert parsed[0].prompt == ["a cat", "7"] and parsed[0].num_inference_steps == 3
    assert from_args(SamplingOptions, parsed[0]) == SamplingOptions(num_inference_steps=3, guidance_scale=2.0)
    assert [flag for _, flag in sample.TEXT_ONLY][:2] == ["--prompt", "--negative-prompt"]


# ---------------------------------------------------------------------- analyze


def test_analyze_bad_choice_is_one_line_with_the_accepted_values():
    base = ["--teacher", "t", "--students", "a", "--out", "o"]
    with pytest.raises(SystemExit) as error:
        main(["analyze", "everything", *base])
    assert str(error.value) == (
        "error: analysis 'everything' is not accepted; expected one of: mse, trajectory, denoising, time, all."
    )
    assert parse_error(analyze.build_parser(), ["mse", *base, "--logger", "wandb"]) == (
        "error: --logger 'wandb' is not accepted; expected one of: tensorboard, csv, none."
    )
    assert parse_error(analyze.build_parser(), ["mse"]) == (
        "error: the following arguments are required: --teacher, --students, --out"
    )


def test_analyze_spellings_parse_to_the_same_arguments():
    dashed = ["all", "--teacher", "t", "--students", "a", "b", "--out", "o", "--n-per-class", "1", "--steps", "10"]
    dashed += ["--guidance-scale", "3", "--cache-dir", "c", "--batch-size", "5", "--n-samples", "9", "--no-progress"]
    underscored = underscored_flags(dashed)
    first, second = (
        from_args(analyze.AnalyzeArguments, analyze.build_parser().parse_args(a)) for a in (dashed, underscored)
    )
    assert first == second
    assert first == analyze.AnalyzeArguments(
        "all", "t", ["a", "b"], "o", n_per_class=1, steps=10, guidance_scale=3.0, cache_dir="c", batch_size=5,
        n_samples=9, progress=False,
    )  # fmt: skip


# ---------------------------------------------------------------------- tune


def test_tune_bad_choice_is_one_line_with_the_accepted_values(tmp_path):
    pytest.importorskip("optuna")
    base = ["--config", "a.yaml", "--search", "s.yaml", "--n-trials", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as error:
        main(["tune", *base, "--sampler", "grid"])
    assert str(error.value) == "error: --sampler 'grid' is not accepted; expected one of: tpe, random, cmaes."
    assert parse_error(tune.build_parser(), [*base, "--pruner", "percentile"]) == (
        "error: --pruner 'percentile' is not accepted; expected one of: median, hyperband, none."
    )
    assert parse_error(tune.build_parser(), ["--search", "s.yaml"]) == (
        "error: the following arguments are required: --config, --n-trials"
    )
    assert not list(tmp_path.iterdir())  # nothing ran


def test_tune_spellings_parse_to_the_same_settings(tmp_path):
    pytest.importorskip("optuna")
    from diffusion_lightning.tuning import TuneSettings

    out = str(tmp_path)
    legacy = ["-c", "a.yaml", "--config", "b.yaml", "--search", "s.yaml", "--n-trials", "4", "--study-name", "x"]
    legacy += ["--heartbeat", "5", "--skip-preflight", "--sampler", "random", "--pruner", "none", "--out", out]
    dashed = ["--config", "a.yaml", "b.yaml", "--search", "s.yaml", "--n-trials", "4", "--study-name", "x"]
    dashed += ["--heartbeat-interval", "5", "--no-preflight", "--sampler", "random", "--pruner", "none", "--out", out]
    underscored = underscored_flags(dashed)
    settings = [from_args(TuneSettings, tune.build_parser().parse_args(argv)) for argv in (legacy, dashed, underscored)]
    assert settings[0] == settings[1] == settings[2]
    assert settings[0] == TuneSettings(
        configs=["a.yaml", "b.yaml"], search="s.yaml", n_trials=4, study_name="x", out=out, sampler="random",
        pruner="none", heartbeat_interval=5, preflight=False,
    )  # fmt: skip
