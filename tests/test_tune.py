"""``diffusion-lightning tune``: search files, checks before any trial, pruning, faults, resuming, results.

:func:`start_tune_worker` / :func:`run_tune_worker` run ``tune`` in a separate process against any
storage URL, for tests with several workers on one database (e.g. with the ``postgres_url`` fixture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from diffusion_lightning.cli import DiffusionCLI, main
from diffusion_lightning.tuning import (
    GlobalStepPruningCallback,
    TuneSettings,
    check_search,
    load_search,
    preflight,
    tune,
)
from diffusion_lightning.tuning import objective as objective_module
from diffusion_lightning.tuning.report import FINISHED, PLOTS
from diffusion_lightning.tuning.study import ORPHANED
from diffusion_lightning.utils.compat import trial_id
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE_CONFIG = REPO / "configs" / "smoke" / "ddpm_mnist.yaml"
SMOKE_SEARCH = REPO / "configs" / "search" / "smoke_ddpm_mnist.yaml"
SEARCH_FILES = sorted((REPO / "configs" / "search").glob("*.yaml"))
#: The seed of the smoke search's documented command: trials 0 and 1 draw sane learning rates, trial 2 draws 1.0.
SMOKE_SEED = 7
HOPELESS_LR = 1.0


# ----------------------------------------------------------------------------- workers in a subprocess


def tune_command(
    storage: str,
    study_name: str,
    n_trials: int,
    out: str | os.PathLike[str],
    *,
    configs: Sequence[str | os.PathLike[str]] = (SMOKE_CONFIG,),
    search: str | os.PathLike[str] = SMOKE_SEARCH,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``python -m diffusion_lightning tune ...`` command line of one worker."""
    command = [sys.executable, "-m", "diffusion_lightning", "tune"]
    for config in configs:
        command += ["--config", os.fspath(config)]
    command += ["--search", os.fspath(search), "--storage", storage, "--study-name", study_name]
    return [*command, "--n-trials", str(n_trials), "--out", os.fspath(out), *extra]


def _worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def start_tune_worker(storage: str, study_name: str, n_trials: int, out: str | os.PathLike[str], **kwargs: Any):
    """Start ``tune`` on ``storage`` in a subprocess (see :func:`tune_command` for ``kwargs``); a ``Popen``.

    Output (stdout and stderr together) is piped: read it with ``communicate()``. ``n_trials`` is
    the target number of finished trials of the whole study, shared by all its workers.
    """
    return subprocess.Popen(
        tune_command(storage, study_name, n_trials, out, **kwargs),
        cwd=REPO,
        env=_worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_tune_worker(
    storage: str, study_name: str, n_trials: int, out: str | os.PathLike[str], timeout: float = 300, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run ``tune`` on ``storage`` in a subprocess until it exits; fails the test (with its output) on error."""
    result = subprocess.run(
        tune_command(storage, study_name, n_trials, out, **kwargs),
        cwd=REPO,
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"tune exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    return result


# ----------------------------------------------------------------------------- the smoke study


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> tuple[Path, optuna.Study]:
    out = tmp_path_factory.mktemp("tune") / "smoke"
    main(["tune", "--config", str(SMOKE_CONFIG), "--search", str(SMOKE_SEARCH), "--n-trials", "4",
          "--seed", str(SMOKE_SEED), "--out", str(out)])  # fmt: skip
    study = optuna.load_study(study_name="smoke_ddpm_mnist", storage=sqlite_url(out / "study.db"))
    return out, study


def test_smoke_study_prunes_the_hopeless_trial_and_writes_results(smoke_study):
    out, study = smoke_study
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials)
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and states.count(TrialState.COMPLETE) >= 2
    hopeless = [t for t in trials if t.params["model.learning_rate"] == HOPELESS_LR]
    assert hopeless and all(t.state == TrialState.PRUNED for t in hopeless)
    for trial in trials:  # several validations per trial, each reported at its own global step
        steps = sorted(trial.intermediate_values)
        assert steps == [2, 4, 6, 8] if trial.state == TrialState.COMPLETE else steps and set(steps) <= {2, 4, 6, 8}
        assert trial.user_attrs["overrides"]["model.learning_rate"] == trial.params["model.learning_rate"]
        assert trial.user_attrs["overrides"]["trainer.val_check_interval"] == 2  # fixed values too
        run = out / "trials" / f"trial_{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run)
        assert (run / "config.yaml").is_file() and any(run.glob("events.out.tfevents.*"))  # logger version trial_<n>
    assert study.best_trial.state == TrialState.COMPLETE

    # best.yaml: the base config with the best values, accepted by the command line
    cli = DiffusionCLI(args=["--config", str(out / "best.yaml")], run=False)
    assert cli.model.learning_rate == pytest.approx(study.best_params["model.learning_rate"])
    assert cli.model.hparams.p_uncond == pytest.approx(study.best_params["model.init_args.p_uncond"])
    assert cli.trainer.max_epochs == 2 and cli.trainer.val_check_interval == 1.0  # fixed values are not applied
    assert "trial" in (out / "best.yaml").read_text().splitlines()[0]

    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 5 and "params_model.learning_rate" in rows[0]
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out.glob(".*.tmp"))


def test_pruning_callback_reports_each_validation_at_its_global_step(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    callback = GlobalStepPruningCallback(trial, "val/loss")
    data = RandomDigits(n=24)
    train = torch.utils.data.DataLoader(data, batch_size=4)
    val = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = quiet_trainer(tmp_path, max_epochs=1, val_check_interval=2, limit_val_batches=1, callbacks=[callback])
    trainer.fit(tiny_ddpm(), train, val)
    assert [step for step, _ in callback.reported] == [2, 4, 6]  # one epoch of 6 steps, three validations
    assert sorted(study.trials[0].intermediate_values) == [2, 4, 6]


def test_pruning_callback_prunes_out_of_fit(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    callback = GlobalStepPruningCallback(study.ask(), "val/loss")
    data = RandomDigits(n=8)
    trainer = quiet_trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, callbacks=[callback])
    with pytest.raises(optuna.TrialPruned, match="step 2"):
        trainer.fit(tiny_ddpm(), torch.utils.data.DataLoader(data, batch_size=2), torch.utils.data.DataLoader(data))


DDP_PRUNING_SCRIPT = """
import json, os, sys
from pathlib import Path

import optuna
import torch
from lightning.pytorch import Callback

from diffusion_lightning.tuning import GlobalStepPruningCallback
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm

storage, trial_id, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
# Both processes run this file (Lightning launches rank 1 with the same command line): both open the same trial.
study = optuna.load_study(
    study_name="ddp", storage=storage, pruner=optuna.pruners.ThresholdPruner(upper=-1.0, n_warmup_steps=3)
)
trial = optuna.trial.Trial(study, trial_id)
report_calls = []
report = trial.report
trial.report = lambda value, step: (report_calls.append(step), report(value, step))[1]
pruning = GlobalStepPruningCallback(trial, "val/loss")


class Record(Callback):
    def on_fit_end(self, trainer, pl_module):
        self.record = dict(rank=trainer.global_rank, world_size=trainer.world_size, pid=os.getpid(),
                           global_step=trainer.global_step, should_stop=trainer.should_stop,
                           ddp=pruning.is_ddp_backend, reported=pruning.reported, report_calls=list(report_calls))


record = Record()
trainer = quiet_trainer(out, accelerator="cpu", devices=2, strategy="ddp", max_steps=8, val_check_interval=2,
                        limit_val_batches=1, callbacks=[pruning, record])
data = RandomDigits(n=32)
loader = torch.utils.data.DataLoader
trainer.fit(tiny_ddpm(), loader(data, batch_size=2), loader(data, batch_size=4))
try:
    pruning.check_pruned()
    record.record["check_pruned"] = None
except optuna.TrialPruned as error:
    record.record["check_pruned"] = str(error)
(out / f"rank{record.record['rank']}.json").write_text(json.dumps(record.record))
"""


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch was built without the gloo backend, which CPU DDP needs",
)
def test_pruning_callback_under_ddp_reports_on_rank_zero_and_stops_every_rank(tmp_path):
    """A real 2-process fit (CPU, gloo): rank 0 reports each validation at its global step, the pruner's
    decision reaches both processes, which stop at the same step, and ``check_pruned`` raises after ``fit``."""
    storage = sqlite_url(tmp_path / "s.db")
    study = optuna.create_study(study_name="ddp", storage=storage)
    trial = study.ask()
    script = tmp_path / "ddp_pruning.py"
    script.write_text(DDP_PRUNING_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**_worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    command = [sys.executable, str(script), storage, str(trial_id(trial)), str(tmp_path)]
    # A session of its own: on a timeout the launched process and the one it launched are killed together.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process fit did not finish in 150 s (a rank left waiting?):\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["world_size"] == 2 and r["ddp"] for r in ranks)
    # Validations at steps 2 and 4; the pruner (warm-up 3 steps) prunes at 4: both processes stop there, of 8.
    assert all(r["global_step"] == 4 and r["should_stop"] for r in ranks), ranks
    steps_and_values = [[step for step, _ in r["reported"]] for r in ranks]
    assert steps_and_values == [[2, 4], [2, 4]]
    assert ranks[0]["reported"] == ranks[1]["reported"]  # the synced val/loss, the same on every rank
    assert ranks[0]["report_calls"] == [2, 4] and ranks[1]["report_calls"] == []  # only rank 0 tells the trial
    assert all(r["check_pruned"] == "Trial was pruned at epoch 4." for r in ranks)  # "epoch" holds the step

    # In the storage: what rank 0 alone reported, at global steps; the parent's check raises after fit.
    after = GlobalStepPruningCallback(optuna.trial.Trial(study, trial_id(trial)), "val/loss")
    with pytest.raises(optuna.TrialPruned, match="epoch 4"):
        after.check_pruned()
    assert study.trials[0].intermediate_values == {step: value for step, value in ranks[0]["reported"]}


# ----------------------------------------------------------------------------- checks before any trial


def _smoke_search(section: str, key: str | None, value: Any) -> dict[str, Any]:
    """The smoke search file with ``section[key] = value`` (the whole section when ``key`` is None)."""
    search = yaml.safe_load(SMOKE_SEARCH.read_text())
    if key is None:
        search[section] = value
    else:
        search.setdefault(section, {})[key] = value
    return search


LR = "model.learning_rate"
UNIT = {"type": "float", "low": 0.1, "high": 1.0}
BAD_SEARCHES = {
    "missing field": (("params", "model.init_args.no_such_field", UNIT), "params.model.init_args.no_such_field"),
    "missing fixed field": (("fixed", "trainer.no_such_flag", 1), "fixed.trainer.no_such_flag"),
    "two spellings": (
        ("params", "model.init_args.learning_rate", UNIT),
        r"params.model\.\S+: names the same field as 'model\.\S*learning_rate'",
    ),
    "unknown type": (("params", LR, {"type": "normal"}), "params.model.learning_rate.type='normal'"),
    "low >= high": (("params", LR, {**UNIT, "low": 1.0e-3, "high": 1.0e-5}), f"params.{LR}: low=0.001 must be < high"),
    "log with low <= 0": (("params", LR, {**UNIT, "low": 0.0, "log": True}), f"params.{LR}: log=true needs low > 0"),
    "empty choices": (("params", LR, {"type": "categorical", "choices": []}), f"params.{LR}.choices=\\[\\]"),
    "unknown key": (("params", LR, {**UNIT, "scale": 2}), f"params.{LR}: unknown key\\(s\\) \\['scale'\\]"),
    "direction": (("objective", None, {"metric": "val/loss", "direction": "lower"}), "objective.direction='lower'"),
    "rejected value": (
        ("params", "data.batch_size", {"type": "categorical", "choices": [16, "many"]}),
        "params.data.batch_size: value 'many' is rejected",
    ),
    "pruner argument": (("pruner", None, {"type": "median", "n_startup": 1}), "pruner.n_startup"),
    "metric never logged": (
        ("objective", None, {"metric": "val/fid", "direction": "minimize"}),
        r"objective.metric='val/fid' is never logged.*'train/loss', 'val/loss'",
    ),
}


@pytest.mark.parametrize("search", BAD_SEARCHES.values(), ids=BAD_SEARCHES.keys())
def test_bad_search_raises_before_any_trial(search, tmp_path):
    change, match = search
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(_smoke_search(*change)))
    settings = TuneSettings(configs=[str(SMOKE_CONFIG)], search=str(path), n_trials=1, out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=match):
        tune(settings)
    assert not (tmp_path / "out").exists()  # no study, no trial


def test_tune_command_reports_errors_and_documents_its_options(tmp_path, capsys):
    with pytest.raises(SystemExit, match="objective.direction"):
        bad = tmp_path / "s.yaml"
        bad.write_text(yaml.safe_dump(_smoke_search("objective", "direction", "up")))
        main(["tune", "--config", str(SMOKE_CONFIG), "--search", str(bad), "--n-trials", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    for option in ("--n-trials", "--study-name", "--storage", "--timeout", "--sampler", "--pruner", "--seed", "--out"):
        assert option in out


def search_base_configs(search: Path) -> list[Path]:
    """The ``--config`` files named by the command in a search file's header comment."""
    header = "".join(line for line in search.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "diffusion-lightning tune" in header, f"{search.name}: the header comment shows no tune command"
    return [REPO / c for c in re.findall(r"--config\s+(\S+)", header)]


@pytest.mark.parametrize("search", SEARCH_FILES, ids=lambda p: p.name)
def test_every_search_file_validates_against_its_base_config(search):
    configs = search_base_configs(search)
    assert configs and all(c.is_file() for c in configs)
    space = load_search(search)
    namespace = check_search(configs, space)
    assert set(space.resolved) == set(space.params) | set(space.fixed)
    assert "val/loss" in preflight(configs, space, namespace)


# ----------------------------------------------------------------------------- faults and resuming


def _fail_first_trial(error: BaseException, number: int = 0):
    real = objective_module.TrialObjective.run_fit

    def run_fit(self, args, callbacks):
        if f"trial_{number}" in " ".join(args):
            raise error
        return real(self, args, callbacks)

    return run_fit


def test_a_raising_trial_is_recorded_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    monkeypatch.setattr(objective_module.TrialObjective, "run_fit", _fail_first_trial(oom))
    settings = TuneSettings(configs=[str(SMOKE_CONFIG)], search=str(SMOKE_SEARCH), n_trials=2, out=str(tmp_path),
                            seed=SMOKE_SEED, preflight=False)  # fmt: skip
    study = tune(settings)
    first, second = study.get_trials()
    assert first.state == TrialState.FAIL and "out of memory" in first.user_attrs["error"]
    assert second.state == TrialState.COMPLETE
    assert (tmp_path / "best.yaml").is_file() and (tmp_path / "trials.csv").is_file()


def test_keyboard_interrupt_stops_the_study(tmp_path, monkeypatch):
    monkeypatch.setattr(objective_module.TrialObjective, "run_fit", _fail_first_trial(KeyboardInterrupt(), number=1))
    settings = TuneSettings(configs=[str(SMOKE_CONFIG)], search=str(SMOKE_SEARCH), n_trials=4, out=str(tmp_path),
                            seed=SMOKE_SEED, preflight=False)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        tune(settings)
    study = optuna.load_study(study_name="smoke_ddpm_mnist", storage=sqlite_url(tmp_path / "study.db"))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    assert (tmp_path / "trials.csv").read_text().count("\n") == 3  # written on the way out


def test_rerun_continues_without_repeating_finished_trials(smoke_study, tmp_path):
    source, _ = smoke_study
    shutil.copy(source / "study.db", tmp_path / "study.db")
    storage = sqlite_url(tmp_path / "study.db")
    killed = optuna.load_study(study_name="smoke_ddpm_mnist", storage=storage)
    killed.ask()  # what a killed process leaves: a RUNNING trial
    before = {t.number: t.datetime_complete for t in killed.get_trials(states=FINISHED)}
    assert len(before) == 4

    result = run_tune_worker(storage, "smoke_ddpm_mnist", 6, tmp_path, extra=["--seed", "3", "--skip-preflight"])
    assert "5 finished trial(s), 1 to run" in result.stderr  # trial 4 failed at start-up
    trials = optuna.load_study(study_name="smoke_ddpm_mnist", storage=storage).get_trials()
    assert len(trials) == 6
    assert {t.number: t.datetime_complete for t in trials[:4]} == before  # not run again
    assert trials[4].state == TrialState.FAIL and trials[4].user_attrs["error"] == ORPHANED
    assert trials[5].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["trial_5"]

    # the target is reached: running again starts nothing
    settings = TuneSettings(configs=[str(SMOKE_CONFIG)], search=str(SMOKE_SEARCH), n_trials=6, out=str(tmp_path),
                            storage=storage, preflight=False)  # fmt: skip
    assert len(tune(settings).get_trials()) == 6


def test_a_resumed_seeded_study_does_not_replay_its_first_draws(tmp_path):
    storage = sqlite_url(tmp_path / "study.db")

    def run(n_trials: int) -> list[optuna.trial.FrozenTrial]:
        settings = TuneSettings(
            configs=[str(SMOKE_CONFIG)], search=str(SMOKE_SEARCH), n_trials=n_trials, out=str(tmp_path),
            storage=storage, seed=7, sampler="random", preflight=False,
        )  # fmt: skip
        return tune(settings).get_trials()

    first = run(2)
    trials = run(4)
    assert [t.params for t in trials[:2]] == [t.params for t in first]
    drawn_again = [t.params["model.init_args.p_uncond"] for t in trials[2:]]
    assert not set(drawn_again) & {t.params["model.init_args.p_uncond"] for t in first}
