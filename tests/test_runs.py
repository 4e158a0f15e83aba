"""Resume and fork: logger versions, parents, checkpoint folders and optimizer state."""

import os
import time

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from diffusion_lightning import WarmupCosineLR
from diffusion_lightning.cli import DiffusionCLI, main
from diffusion_lightning.loggers import RunLineage, find_last_checkpoint, plan_run, read_lineage
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE = str(REPO / "configs/smoke/ddpm_mnist.yaml")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scalar_steps(folder, tag="train/loss"):
    """Steps of ``tag`` in each event file of a TensorBoard version folder, file by file."""
    per_file = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            per_file.append([event.step for event in events.Scalars(tag)])
    return per_file


# ---------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    base += ["--trainer.limit_val_batches", "1"]
    logs = root / "lightning_logs"
    main(base)  # 2 epochs x 4 steps
    first = {"steps": scalar_steps(logs / "version_0")}
    main([*base, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    resumed = {"versions": sorted(p.name for p in logs.iterdir()), "steps": scalar_steps(logs / "version_0")}
    parent = root / "checkpoints" / "last.ckpt"
    parent_mtime = parent.stat().st_mtime_ns
    fork_args = ["--trainer.max_epochs", "4", "--fork_from", str(parent), "--model.init_args.learning_rate", "4e-4"]
    main([*base, *fork_args])
    return {"root": root, "first": first, "resumed": resumed, "parent": parent, "parent_mtime": parent_mtime}


def test_resume_continues_the_same_version_from_the_checkpoint_step(cli_runs):
    first, resumed = cli_runs["first"]["steps"], cli_runs["resumed"]["steps"]
    assert first == [list(range(8))]
    assert cli_runs["resumed"]["versions"] == ["version_0"]
    assert len(resumed) == 2 and resumed[0] == first[0]
    assert resumed[1] == [8, 9, 10, 11]  # picks up right after the first run's last step
    config = yaml.safe_load((cli_runs["root"] / "lightning_logs/version_0/config.yaml").read_text())
    assert config["trainer"]["logger"]["init_args"]["version"] == 0 and config["ckpt_path"] == "last"


def test_steps_logged_after_the_resumed_checkpoint_show_once(tmp_path):
    # what a run killed after step 5 leaves: steps 0-5 logged, a checkpoint at step 4; the resume logs 4-7
    base = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar",
            "false", "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null", "--checkpoint.save_top_k",
            "-1", "--checkpoint.every_n_train_steps", "4", "--checkpoint.filename", "step{step}"]  # fmt: skip
    main([*base, "--trainer.max_steps", "6"])
    version = tmp_path / "lightning_logs" / "version_0"
    assert scalar_steps(version) == [list(range(6))]
    main([*base, "--ckpt_path", str(tmp_path / "checkpoints" / "step4.ckpt")])
    assert scalar_steps(version)[1] == [4, 5, 6, 7]  # 4 and 5 are in both files
    events = EventAccumulator(str(version))  # the folder, as TensorBoard reads it
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(8))
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["trainer"]["logger"]["init_args"]["purge_step"] == 4


def test_fork_logs_a_new_version_from_the_parent_step_and_names_its_parent(cli_runs):
    root, parent = cli_runs["root"], cli_runs["parent"]
    fork_dir = root / "lightning_logs" / "version_1"
    assert scalar_steps(fork_dir) == [[12, 13, 14, 15]]
    hparams = yaml.unsafe_load((fork_dir / "hparams.yaml").read_text())
    assert hparams["run"] == {"parent_checkpoint": str(parent), "parent_version": 0, "parent_step": 12}
    assert hparams["learning_rate"] == pytest.approx(4e-4)
    # the fork keeps its checkpoints apart: the parent's last.ckpt is untouched
    assert parent.stat().st_mtime_ns == cli_runs["parent_mtime"]
    assert torch.load(parent, weights_only=False)["global_step"] == 12
    lineage = read_lineage(root / "checkpoints" / "version_1" / "last.ckpt")
    assert lineage["global_step"] == 16
    assert [logger["version"] for logger in lineage["loggers"]] == [1]
    assert lineage["parent"]["checkpoint"] == str(parent) and lineage["parent"]["global_step"] == 12
    assert [logger["version"] for logger in lineage["parent"]["loggers"]] == [0]


def test_fork_trains_with_its_own_learning_rate_and_the_parent_moments(cli_runs):
    ckpt = torch.load(cli_runs["root"] / "checkpoints" / "version_1" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [group["initial_lr"] for group in groups] == pytest.approx([4e-4] * len(groups))
    assert ckpt["lr_schedulers"][0]["base_lrs"] == pytest.approx([4e-4] * len(groups))
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 16
    steps = {float(state["step"]) for state in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {16.0}  # Adam's step count went on from the parent's 12: its moments were kept


def test_fork_from_is_for_fit_only(cli_runs):
    with pytest.raises(ValueError, match="fork_from=.*fit only"):
        DiffusionCLI(args=["validate", "--config", SMOKE, "--fork_from", str(cli_runs["parent"])])


# ---------------------------------------------------------------------- the callback, without the CLI


def fit(tmp_path, name, steps, ckpt_path=None, fork_from=None, logger=True, **model_kwargs):
    seed_everything(0)
    model_kwargs.setdefault("lr_scheduler", lambda opt: WarmupCosineLR(opt, warmup_steps=2, total_steps=8))
    model = tiny_ddpm(**model_kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=steps,
        enable_checkpointing=True,
        logger=TensorBoardLogger(tmp_path) if logger else False,
        callbacks=[checkpoint, RunLineage(fork_from=fork_from)],
    )
    trainer.fit(model, DataLoader(RandomDigits(32), batch_size=8), ckpt_path=ckpt_path)
    return model, trainer


def test_a_fork_that_changes_nothing_trains_exactly_like_a_resume(tmp_path):
    fit(tmp_path, "parent", 4)
    parent = tmp_path / "parent" / "last.ckpt"
    resumed, _ = fit(tmp_path, "resumed", 8, ckpt_path=parent)
    forked, trainer = fit(tmp_path, "forked", 8, ckpt_path=parent, fork_from=parent)
    assert trainer.global_step == 8
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(forked.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert read_lineage(tmp_path / "forked" / "last.ckpt")["parent"]["global_step"] == 4


def test_a_fork_with_another_learning_rate_uses_it_from_its_first_step(tmp_path):
    fit(tmp_path, "parent", 4, learning_rate=1e-3)
    parent = tmp_path / "parent" / "last.ckpt"
    _, trainer = fit(tmp_path, "forked", 5, ckpt_path=parent, fork_from=parent, learning_rate=2e-4)
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [2e-4] * len(optimizer.param_groups) and scheduler.last_epoch == 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * scheduler.factor(5))
    assert trainer.logger.version == 1
    hparams = yaml.unsafe_load((tmp_path / "lightning_logs/version_1/hparams.yaml").read_text())
    assert hparams["run"]["parent_version"] == 0 and hparams["run"]["parent_step"] == 4


def test_fork_from_must_be_the_restored_checkpoint(tmp_path):
    fit(tmp_path, "parent", 2, logger=False)
    parent = tmp_path / "parent" / "last.ckpt"
    with pytest.raises(ValueError, match="forks only when fit is given it as ckpt_path"):
        fit(tmp_path, "a", 3, fork_from=parent, logger=False)
    other = tmp_path / "other.ckpt"
    other.write_bytes(parent.read_bytes())
    with pytest.raises(ValueError, match="differs from the checkpoint fit restores"):
        fit(tmp_path, "b", 3, ckpt_path=other, fork_from=parent, logger=False)


# ---------------------------------------------------------------------- planning, from configs


def fake_checkpoint(path, loggers=None, step=5):
    state = {"state_dict": {}, "global_step": step, "callbacks": {}}
    if loggers is not None:
        state["callbacks"]["RunLineage"] = {"loggers": loggers, "parent": None}
    torch.save(state, path)
    return path


TB = "lightning.pytorch.loggers.tensorboard.TensorBoardLogger"
CSV = "lightning.pytorch.loggers.CSVLogger"


def test_find_last_checkpoint_is_the_newest_last_file(tmp_path):
    assert find_last_checkpoint(tmp_path / "missing") is None
    for age, name in enumerate(["last-v1.ckpt", "last.ckpt", "best.ckpt"]):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (time.time() - 10 * age, time.time() - 10 * age))
    assert find_last_checkpoint(tmp_path) == tmp_path / "last-v1.ckpt"
    # the temporary of a save killed mid-write is newer, but it is not a checkpoint (as for Lightning's "last")
    (tmp_path / ".last.ckpt.4242-abc.tmp").write_text("half")
    assert find_last_checkpoint(tmp_path) == tmp_path / "last-v1.ckpt"


def test_plan_resume_reuses_the_recorded_version_and_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    ckpt = fake_checkpoint(
        tmp_path / "runs" / "epoch=1.ckpt", [{"class_path": TB, "name": "lightning_logs", "version": 3}]
    )
    plan = plan_run(
        {"ckpt_path": str(ckpt), "trainer": {"logger": None}, "checkpoint": {"dirpath": None}}, str(tmp_path)
    )
    assert plan.mode == "resume" and plan.checkpoint == ckpt
    # TensorBoard hides what the killed run logged after the checkpoint's step (the resumed run logs it again)
    expected = {"save_dir": str(tmp_path), "version": 3, "purge_step": 5}
    assert plan.overrides["trainer"]["logger"]["init_args"] == expected
    assert plan.overrides["checkpoint"]["dirpath"] == str(tmp_path / "runs")
    # another logger class than the one recorded starts a new version
    csv = {"class_path": CSV, "init_args": {"save_dir": str(tmp_path), "version": None}}
    plan = plan_run({"ckpt_path": str(ckpt), "trainer": {"logger": csv}, "checkpoint": {"dirpath": "d"}}, str(tmp_path))
    assert "trainer" not in plan.overrides and "checkpoint" not in plan.overrides


def test_plan_resume_of_a_checkpoint_without_lineage_warns(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="does not record its logger version"):
        plan = plan_run({"ckpt_path": str(ckpt), "trainer": {"logger": None}}, str(tmp_path))
    assert "trainer" not in plan.overrides


def test_plan_fork_takes_the_next_free_version(tmp_path):
    for version in (0, 1):
        (tmp_path / "logs" / f"version_{version}").mkdir(parents=True)
    ckpt = fake_checkpoint(tmp_path / "p.ckpt", [{"class_path": CSV, "name": "logs", "version": 0}])
    csv = {"class_path": CSV, "init_args": {"save_dir": str(tmp_path), "name": "logs", "version": None}}
    plan = plan_run({"fork_from": str(ckpt), "trainer": {"logger": [csv]}, "checkpoint": {}}, str(tmp_path))
    assert plan.mode == "fork" and plan.lineage["global_step"] == 5
    assert plan.overrides["trainer"]["logger"][0]["init_args"]["version"] == 2
    assert plan.overrides["checkpoint"]["dirpath"] == os.path.join(tmp_path, "checkpoints", "version_2")


@pytest.mark.parametrize(
    ("logger", "error", "match"),
    [
        ({"class_path": CSV, "init_args": {"name": "logs", "version": 0}}, ValueError, "version=0 is the parent's"),
        (False, ValueError, "fork_from needs a logger"),
    ],
)
def test_plan_fork_refuses_to_overwrite_the_parent(tmp_path, logger, error, match):
    ckpt = fake_checkpoint(tmp_path / "p.ckpt", [{"class_path": CSV, "name": "logs", "version": 0}])
    with pytest.raises(error, match=match):
        plan_run({"fork_from": str(ckpt), "trainer": {"logger": logger}, "checkpoint": {}}, str(tmp_path))


def test_plan_fork_from_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fork_from='nowhere.ckpt' does not exist"):
        plan_run({"fork_from": "nowhere.ckpt", "trainer": {"logger": None}}, str(tmp_path))


def test_plan_fresh_keeps_the_default_checkpoint_folder(tmp_path):
    plan = plan_run({"trainer": {"logger": None}, "checkpoint": {"dirpath": None}}, str(tmp_path))
    assert plan.mode == "fresh" and plan.overrides == {"checkpoint": {"dirpath": str(tmp_path / "checkpoints")}}
