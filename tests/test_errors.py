"""Mistakes in the input end a command with one ``error:`` line (exit code 2); bugs keep their traceback.

The console entry point runs in fresh interpreters: a driver process calls
``diffusion_lightning.cli.main`` (the function behind ``diffusion-lightning`` and ``python -m
diffusion_lightning``) once per case and reports each case's stderr and exit code as the interpreter
would (one import of the package for all the cases), and a few cases run as
``python -m diffusion_lightning`` for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lightning.errors import ENV_VAR, TRACEBACK_HINT, user_error
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE = str(REPO / "configs/smoke/ddpm_mnist.yaml")

#: Runs the cases read from stdin; each one's stderr between marker lines, then its exit code.
DRIVER = r"""
import json, os, sys, traceback
from diffusion_lightning.cli import main

for case in json.load(sys.stdin):
    os.environ.pop("DIFFUSION_LIGHTNING_TRACEBACK", None)
    os.environ.update(case.get("env", {}))
    if case.get("patch"):
        exec(case["patch"])
    sys.stderr.write(f"\n@@begin {case['name']}\n")
    try:
        main(case["argv"])
        code = 0
    except SystemExit as error:  # what the interpreter does with it
        code = error.code
        if isinstance(code, str):
            sys.stderr.write(code + "\n")
        code = 0 if code is None else code if isinstance(code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    sys.stderr.write(f"\n@@end {case['name']} {code}\n")
    sys.stderr.flush()
"""

#: ``load_module`` of export replaced by a failure that no input explains.
BUG = """
import diffusion_lightning.commands.export as export
def load_module(*args, **kwargs):
    raise RuntimeError("simulated bug in load_module")
export.load_module = load_module
"""
#: A ValueError inside the package's code that no ``raise`` statement raised (``int()`` of a checkpoint's odd
#: step), while fit plans its run.
IMPLICIT_BUG = """
import diffusion_lightning.cli as cli
from diffusion_lightning.loggers.runs import read_lineage
cli.plan_run = lambda config, root: read_lineage(os.environ["ODD_CHECKPOINT"])
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a real checkpoint and broken ones, bad configs and a regular file."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    module = tiny_ddpm(class_names=["a", "b", "c"])
    trainer = quiet_trainer(folder, max_steps=1, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(RandomDigits(n=8), batch_size=4))
    trainer.save_checkpoint(folder / "good.ckpt")
    data = (folder / "good.ckpt").read_bytes()
    (folder / "half.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "notes.ckpt").write_text("not a checkpoint\n")
    checkpoint = torch.load(folder / "good.ckpt", map_location="cpu", weights_only=False)
    checkpoint["diffusion_lightning"]["module_class"] = "nowhere.TinyDDPM"
    checkpoint["hyper_parameters"].pop("_class_path", None)
    torch.save(checkpoint, folder / "moved.ckpt")
    torch.save({"state_dict": {}, "global_step": "many"}, folder / "odd_step.ckpt")
    (folder / "a_file").write_text("a regular file\n")
    (folder / "typo.yaml").write_text("trainer:\n  max_epoch: 2\n")
    (folder / "broken.yaml").write_text("trainer: [1\n")
    return folder


def cases(f: Path) -> list[tuple[str, list[str], dict, list[str]]]:
    """``(name, argv, extra, words)``: the error line must hold every word; ``extra`` may set env or patch."""
    fit = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(f / "run")]
    export = ["export", "--out", str(f / "pipeline")]
    return [
        ("missing config", ["fit", "--config", str(f / "missing.yaml")], {}, ["config", "missing.yaml", "not exist"]),
        ("config key typo", [*fit, "--config", str(f / "typo.yaml")], {}, ["trainer.max_epoch"]),
        ("flag typo", [*fit, "--trainer.max_epohs", "3"], {}, ["--trainer.max_epohs"]),
        ("model argument typo", [*fit, "--model.init_args.lerning_rate", "3"], {}, ["lerning_rate"]),
        ("invalid YAML", [*fit, "--config", str(f / "broken.yaml")], {}, ["broken.yaml", "not valid YAML"]),
        ("bad choice value", [*fit, "--model.init_args.loss_type", "l3"], {}, ["loss_type", "l3", "l2", "huber"]),
        ("bad int value", [*fit, "--trainer.max_epochs", "abc"], {}, ["trainer.max_epochs", "'abc'", "an int"]),
        ("bad class path", [*fit, "--model", "nowhere.Model"], {}, ["model", "nowhere.Model", "No module"]),
        ("unknown command", ["fitt", "--config", SMOKE], {}, ["'fitt'", "fit", "export"]),
        (
            "data setup error",
            [*fit, "--data.init_args.source", "idx", "--data.init_args.root", str(f / "no_mnist")],
            {},
            ["MNIST IDX files", "no_mnist"],
        ),
        ("Lightning misconfiguration", [*fit, "--checkpoint.mode", "sideways"], {}, ["mode", "sideways"]),
        ("fit: missing ckpt_path", [*fit, "--ckpt_path", str(f / "missing.ckpt")], {}, ["checkpoint", "missing.ckpt"]),
        ("fit: truncated ckpt_path", [*fit, "--ckpt_path", str(f / "half.ckpt")], {}, ["half.ckpt", "truncated"]),
        ("export: missing ckpt", [*export, "--ckpt", str(f / "missing.ckpt")], {}, ["missing.ckpt", "not exist"]),
        (
            "export: truncated ckpt",
            [*export, "--ckpt", str(f / "half.ckpt")],
            {},
            ["checkpoint", "half.ckpt", "truncated", "central directory"],
        ),
        ("export: text file .ckpt", [*export, "--ckpt", str(f / "notes.ckpt")], {}, ["notes.ckpt", "not a checkpoint"]),
        (
            "export: class path not importable",
            [*export, "--ckpt", str(f / "moved.ckpt")],
            {},
            ["moved.ckpt", "nowhere.TinyDDPM", "No module named 'nowhere'"],
        ),
        (
            "export: --out under a file",
            ["export", "--ckpt", str(f / "good.ckpt"), "--out", str(f / "a_file" / "pipeline")],
            {},
            ["--out", "a_file"],
        ),
        (
            "evaluate: bad flag value",
            ["evaluate", "--real", "test", "--n-samples", "many"],
            {},
            ["--n-samples", "many"],
        ),
        ("sample: bad flag value", ["sample", "--pipeline", "p", "--scheduler", "nope"], {}, ["--scheduler", "nope"]),
        (
            "sample: flag typo",
            ["sample", "--pipeline", "p", "--n-per-clss", "2"],
            {},
            ["--n-per-clss"],
        ),
    ]


def run_driver(runs: list[dict]) -> dict[str, tuple[int, str]]:
    """Each case's ``(exit code, stderr)``, from one fresh interpreter that calls ``main`` per case."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop(ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], input=json.dumps(runs), capture_output=True, text=True, cwd=REPO, env=env
    )
    results: dict[str, tuple[int, str]] = {}
    for chunk in done.stderr.split("\n@@begin ")[1:]:
        name, _, rest = chunk.partition("\n")
        text, _, end = rest.rpartition("\n@@end ")
        results[name] = (int(end.split()[-1]), text)
    assert len(results) == len(runs), done.stderr[-3000:]
    return results


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "hint:"))]


def assert_one_error(code: int, stderr: str, words: list[str]) -> str:
    """The ``error:`` line, once checked: exit code 2, one error line, at most one hint after it, no traceback."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) in (1, 2) and lines[0].startswith("error:"), stderr
    assert len(lines) == 1 or lines[1].startswith("hint:"), stderr
    assert not any(line.startswith("usage:") for line in stderr.splitlines()), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def outcomes(files: Path) -> dict[str, tuple[int, str]]:
    runs = [{"name": name, "argv": argv, **extra} for name, argv, extra, _ in cases(files)]
    half, notes, odd = (str(files / name) for name in ("half.ckpt", "notes.ckpt", "odd_step.ckpt"))
    out = ["--out", str(files / "pipeline")]
    fit = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(files / "run")]
    runs += [
        {"name": "--traceback after the command", "argv": ["export", "--ckpt", half, *out, "--traceback"]},
        {"name": "--traceback before the command", "argv": ["--traceback", "fit", "--config", "missing.yaml"]},
        {"name": "traceback from the environment", "argv": ["export", "--ckpt", notes, *out], "env": {ENV_VAR: "1"}},
        {"name": "bug: implicit ValueError", "argv": fit, "patch": IMPLICIT_BUG, "env": {"ODD_CHECKPOINT": odd}},
        {"name": "bug: RuntimeError", "argv": ["export", "--ckpt", half, *out], "patch": BUG},  # last: it stays
    ]
    return run_driver(runs)


def test_each_mistake_is_one_error_line_naming_what_is_wrong(files, outcomes):
    for name, _, _, words in cases(files):
        code, stderr = outcomes[name]
        assert_one_error(code, stderr, words)
    assert not (files / "pipeline").exists()  # export stopped before writing


def test_hints_name_the_closest_key_or_command(outcomes):
    hints = {name: error_lines(stderr)[1:] for name, (_, stderr) in outcomes.items()}
    assert hints["config key typo"] == ["hint: did you mean trainer.max_epochs?"]
    assert hints["flag typo"] == ["hint: did you mean --trainer.max_epochs?"]
    assert hints["sample: flag typo"] == ["hint: did you mean --n-per-class?"]
    assert hints["model argument typo"] == ["hint: did you mean model.init_args.learning_rate?"]
    assert hints["unknown command"] == ["hint: did you mean 'fit'?"]
    assert hints["data setup error"] == [TRACEBACK_HINT]  # found while running: where may matter
    assert hints["missing config"] == hints["sample: bad flag value"] == []


def test_traceback_flag_and_environment_variable_show_the_traceback(outcomes):
    for name, words in (
        ("--traceback after the command", ["half.ckpt", "truncated"]),
        ("--traceback before the command", ["missing.yaml"]),
        ("traceback from the environment", ["notes.ckpt"]),
    ):
        code, stderr = outcomes[name]
        assert code == 2 and "Traceback (most recent call last)" in stderr, (name, stderr)
        lines = error_lines(stderr)
        assert len(lines) in (1, 2) and all(word in lines[0] for word in words), (name, lines)
        assert stderr.rstrip().splitlines()[-len(lines)] == lines[0]  # the error line comes last
    assert "central directory" in outcomes["--traceback after the command"][1]  # torch's own error, in the chain


def test_a_bug_keeps_its_traceback(outcomes):
    for name, last in (("bug: RuntimeError", "RuntimeError: simulated"), ("bug: implicit ValueError", "ValueError:")):
        code, stderr = outcomes[name]
        assert code == 1 and "Traceback (most recent call last)" in stderr, (name, stderr)
        assert stderr.rstrip().splitlines()[-1].startswith(last), (name, stderr)
        assert not error_lines(stderr), (name, stderr)


def test_the_console_entry_point_reports_one_line_and_exit_code_2(files, tmp_path):
    """``python -m diffusion_lightning`` for real, two processes at once: LightningCLI's parser and a checkpoint."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(ENV_VAR, None)
    command = [sys.executable, "-m", "diffusion_lightning"]
    fit = [*command, "fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path)]
    export = [*command, "export", "--ckpt", str(files / "half.ckpt"), "--out", str(tmp_path / "p")]
    started = [
        subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        for argv in ([*fit, "--model.init_args.loss_type", "l3"], export)
    ]
    (fit_err, fit_code), (stderr, code) = [(p.communicate()[1], p.returncode) for p in started]
    assert_one_error(fit_code, fit_err, ["loss_type", "l3"])
    line = assert_one_error(code, stderr, ["half.ckpt", "truncated"])
    assert stderr.strip() == line  # nothing else on stderr


def test_the_rule_on_exceptions_raised_here_and_elsewhere(files):
    from diffusion_lightning.errors import UserError
    from diffusion_lightning.modules.loading import read_checkpoint

    with pytest.raises(ValueError) as raised:
        read_checkpoint(files / "notes.ckpt")
    assert user_error(raised.value).message.startswith(f"error: checkpoint {str(files / 'notes.ckpt')!r}")
    assert user_error(ValueError("raised by no one")) is None  # no traceback into the package
    with pytest.raises(ValueError) as raised:
        int("x")  # raised outside the package
    assert user_error(raised.value) is None
    assert user_error(UserError("count=-1 must be >= 0")).message == "error: count=-1 must be >= 0"
    assert user_error(NotADirectoryError(20, "Not a directory", "a/b")).message == "error: Not a directory: 'a/b'"
    assert user_error(RuntimeError("deep inside torch")) is None
    assert user_error(SystemExit("error: --x 'y' is not accepted.\nhint: try --z")).hint == "hint: try --z"
    assert user_error(SystemExit(2)) is None and user_error(KeyboardInterrupt()) is None
