"""Several ``tune`` workers on one study in a real PostgreSQL server (started on loopback by the fixture)."""

from __future__ import annotations

import optuna

from tests.test_tune import start_tune_worker


def test_two_workers_share_one_postgres_study_and_run_distinct_trials(postgres_url, tmp_path):
    study_name = "two-workers"
    n_trials = 4
    workers = [
        start_tune_worker(postgres_url, study_name, n_trials, tmp_path / f"worker{i}", extra=["--seed", str(i)])
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-6000:]

    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    # the budget is shared: each worker runs what remains, so together at least n_trials, at most one extra each
    assert n_trials <= len(finished) <= n_trials + 1
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # both processes ran trials, and no trial's folder was written twice
    workers_seen = {t.user_attrs["worker"] for t in finished}
    assert len(workers_seen) == 2, workers_seen
    run_dirs = [t.user_attrs["run_dir"] for t in finished]
    assert len(run_dirs) == len(set(run_dirs))
    assert study.best_trial.state == optuna.trial.TrialState.COMPLETE
