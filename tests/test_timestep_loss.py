"""TimestepLoss and TimestepLossLogger: the loss per timestep bucket, logged in real fits, monitorable, resumable."""

import csv
import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from diffusion_lightning import ClassConditionedDDPM
from diffusion_lightning.callbacks import TimestepLossLogger
from diffusion_lightning.metrics.timestep import TimestepLoss, bucket_edges, bucket_names
from tests.conftest import Crash, CrashAt, RandomDigits, quiet_trainer, tiny_config, tiny_ddpm

#: The four buckets over T=100, written out: what the recomputations below group by.
EDGES_100 = [(0, 24), (25, 49), (50, 74), (75, 99)]
NAMES_100 = ["t00-24", "t25-49", "t50-74", "t75-99"]

# ---------------------------------------------------------------------- the metric


@pytest.mark.parametrize("num_buckets, steps", [(3, 10), (4, 100), (7, 100), (10, 1000), (1, 5), (5, 5)])
def test_bucket_edges_cover_every_timestep_once_and_agree_with_the_metric(num_buckets, steps):
    edges = bucket_edges(num_buckets, steps)
    assert len(edges) == num_buckets
    covered = [t for lo, hi in edges for t in range(lo, hi + 1)]
    assert covered == list(range(steps))  # in order, each timestep exactly once
    widths = [hi - lo + 1 for lo, hi in edges]
    assert max(widths) - min(widths) <= 1  # equal ranges
    # the metric puts each timestep in the bucket whose edges hold it
    metric = TimestepLoss(num_buckets, steps)
    timesteps = torch.arange(steps)
    metric.update(torch.ones(steps), timesteps)
    assert metric.counts.tolist() == widths


def test_three_buckets_over_ten_timesteps():
    assert bucket_edges(3, 10) == [(0, 3), (4, 6), (7, 9)]
    assert bucket_names(3, 10) == ["t0-3", "t4-6", "t7-9"]


def test_bucket_names_are_zero_padded():
    names = bucket_names(10, 1000)
    assert names[0] == "t000-099" and names[1] == "t100-199" and names[-1] == "t900-999" and len(names) == 10
    assert bucket_names(4, 100) == NAMES_100
    assert TimestepLoss(4, 100).names == NAMES_100


@pytest.mark.parametrize("num_buckets", [0, 11])
def test_bucket_edges_reject_a_count_outside_one_to_t(num_buckets):
    with pytest.raises(ValueError, match=rf"num_buckets={num_buckets} .*num_train_timesteps=10"):
        bucket_edges(num_buckets, 10)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric TimestepLoss was called before")
def test_known_losses_give_known_means_empty_buckets_nan_and_reset():
    metric = TimestepLoss(4, 100)
    metric.update(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 24, 25]))
    metric.update(torch.tensor([20.0, 5.0]), torch.tensor([99, 76]))
    means = metric.compute()
    assert means.dtype == torch.float64
    assert means[0].item() == 2.0 and means[1].item() == 10.0 and means[3].item() == 12.5
    assert math.isnan(means[2].item())  # no sample in 50-74
    assert metric.overall().item() == pytest.approx(39 / 5)
    metric.reset()
    assert all(math.isnan(v) for v in metric.compute().tolist()) and math.isnan(metric.overall().item())
    metric.update(torch.tensor([4.0]), torch.tensor([60]))
    assert metric.compute()[2].item() == 4.0 and metric.overall().item() == 4.0


# ---------------------------------------------------------------------- what a real fit logs


class Outputs(Callback):
    """Keeps what every training, validation and test step returned (listed before the logger)."""

    def __init__(self) -> None:
        self.train: list[dict] = []
        self.val: list[dict] = []
        self.test: list[dict] = []

    @staticmethod
    def _keep(trainer, outputs) -> dict:
        return {
            "epoch": trainer.current_epoch,
            "losses": outputs["per_sample_loss"].detach().double().tolist(),
            "timesteps": outputs["timesteps"].tolist(),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(self._keep(trainer, outputs))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.append(self._keep(trainer, outputs))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test.append(self._keep(trainer, outputs))


def bucket_means(steps: list[dict], edges=EDGES_100) -> tuple[list[float | None], float]:
    """Mean loss per ``(lo, hi)`` bucket (``None`` when empty) and overall, from kept step outputs."""
    pairs = [(loss, t) for step in steps for loss, t in zip(step["losses"], step["timesteps"])]
    means = []
    for lo, hi in edges:
        inside = [loss for loss, t in pairs if lo <= t <= hi]
        means.append(sum(inside) / len(inside) if inside else None)
    return means, sum(loss for loss, _ in pairs) / len(pairs)


def read_csv(logger: CSVLogger) -> list[dict[str, float]]:
    with open(f"{logger.log_dir}/metrics.csv", newline="") as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def digits(n: int, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RandomDigits(n, seed=seed), batch_size=batch_size)


def test_fit_logs_the_buckets_at_the_logging_steps_and_validation_and_test_over_the_pass(tmp_path):
    outputs = Outputs()
    callback = TimestepLossLogger(num_buckets=4)
    logger = CSVLogger(tmp_path, name="csv")
    module = tiny_ddpm(num_train_timesteps=100)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, logger=logger, log_every_n_steps=2, limit_val_batches=2, callbacks=[outputs, callback]
    )
    trainer.fit(module, digits(12, 4), digits(8, 4, seed=1))  # 3 batches per epoch: a window spans epochs
    rows = read_csv(logger)

    # training: at exactly the steps Lightning writes step metrics (the module's train/loss)
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row for row in rows if any(k.startswith("diffusion/") for k in row)] == train_rows
    assert [int(row["step"]) for row in train_rows] == [1, 3, 5]  # log_every_n_steps=2: batches 2, 4 and 6
    previous, empty_seen = -1, False
    for row in train_rows:
        step = int(row["step"])
        means, total = bucket_means(outputs.train[previous + 1 : step + 1])  # the batches since the previous log
        previous = step
        assert row["diffusion/loss"] == pytest.approx(total, rel=1e-6)
        for name, mean in zip(NAMES_100, means):
            if mean is None:  # an empty bucket is left out, not repeated from an earlier log
                empty_seen = True
                assert f"diffusion/loss_{name}" not in row, (step, name)
            else:
                assert row[f"diffusion/loss_{name}"] == pytest.approx(mean, rel=1e-6), (step, name)
    assert empty_seen  # the seeded timesteps leave a bucket empty in some window: that case is covered

    # validation: over the whole pass (not the sanity check), once per epoch
    val_rows = [row for row in rows if "val/loss" in row]
    assert [int(row["epoch"]) for row in val_rows] == [0, 1]
    for epoch, row in enumerate(val_rows):
        means, _ = bucket_means([s for s in outputs.val if s["epoch"] == epoch])
        assert all(mean is not None for mean in means)  # stratified timesteps fill every bucket
        assert {k for k in row if k.startswith("val/loss_")} == {f"val/loss_{n}" for n in NAMES_100}
        for name, mean in zip(NAMES_100, means):
            assert row[f"val/loss_{name}"] == pytest.approx(mean, rel=1e-6)
    assert trainer.callback_metrics["val/loss_t75-99"].item() == pytest.approx(val_rows[-1]["val/loss_t75-99"])

    # the per-epoch history: every sample of the epoch, whatever the logging windows
    assert [(r["epoch"], r["step"]) for r in callback.history] == [(0, 3), (1, 6)]
    for record in callback.history:
        epoch = record["epoch"]
        train, _ = bucket_means([s for s in outputs.train if s["epoch"] == epoch])
        val, _ = bucket_means([s for s in outputs.val if s["epoch"] == epoch])
        assert record["train_loss_per_bucket"] == pytest.approx(train, rel=1e-9)
        assert record["val_loss_per_bucket"] == pytest.approx(val, rel=1e-9)
    assert callback.bucket_edges == EDGES_100

    # validate and test: the same over their pass, and the history is a record of fitting only
    history = [dict(r) for r in callback.history]
    (results,) = trainer.validate(module, digits(8, 4, seed=1), verbose=False)
    assert results["val/loss_t75-99"] == pytest.approx(val_rows[-1]["val/loss_t75-99"], rel=1e-6)
    assert callback.history == history
    (results,) = trainer.test(module, digits(8, 4, seed=2), verbose=False)
    means, _ = bucket_means(outputs.test)
    assert {k for k in results if k.startswith("test/loss_")} == {f"test/loss_{n}" for n in NAMES_100}
    for name, mean in zip(NAMES_100, means):
        assert results[f"test/loss_{name}"] == pytest.approx(mean, rel=1e-6)
    assert callback.history == history


@pytest.mark.parametrize("switch", ["train", "val"])
def test_each_switch_turns_off_only_its_part(tmp_path, switch):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1, limit_val_batches=1,
        callbacks=[TimestepLossLogger(num_buckets=2, **{switch: False})],
    )  # fmt: skip
    trainer.fit(tiny_ddpm(num_train_timesteps=100), digits(8, 4), digits(4, 4))
    keys = {k for row in read_csv(logger) for k in row}
    train = {k for k in keys if k.startswith("diffusion/loss")}
    val = {k for k in keys if k.startswith("val/loss_")}
    assert (train, val) == ((set(), {"val/loss_t00-49", "val/loss_t50-99"}) if switch == "train" else (
        {"diffusion/loss", "diffusion/loss_t00-49", "diffusion/loss_t50-99"}, set()
    ))  # fmt: skip


def test_steps_without_per_sample_losses_warn_once_and_log_nothing(tmp_path):
    class LossOnly(ClassConditionedDDPM):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    module = LossOnly(net=tiny_config(), image_size=8, num_classes=3)
    callback = TimestepLossLogger(num_buckets=2)
    trainer = quiet_trainer(tmp_path, max_steps=2, log_every_n_steps=1, limit_val_batches=0, callbacks=[callback])
    with pytest.warns(UserWarning, match="no 'per_sample_loss'") as warned:
        trainer.fit(module, digits(8, 4))
    assert sum("per_sample_loss" in str(w.message) for w in warned) == 1
    assert not any(k.startswith("diffusion/") for k in trainer.logged_metrics) and callback.history == []


# ---------------------------------------------------------------------- monitoring one noise level


def test_early_stopping_and_model_checkpoint_watch_one_bucket(tmp_path):
    # T=1000 and validation batches of 10: stratified timesteps put one sample in each of the 10 buckets
    callback = TimestepLossLogger()
    # improving means dropping by more than 1e6: the second validation cannot, so the run stops after it
    stop = EarlyStopping(monitor="val/loss_t900-999", mode="min", patience=1, min_delta=1e6)
    best = ModelCheckpoint(tmp_path / "ckpt", filename="{epoch}", monitor="val/loss_t900-999", mode="min")
    trainer = quiet_trainer(
        tmp_path, max_epochs=5, limit_train_batches=2, enable_checkpointing=True, callbacks=[callback, stop, best]
    )
    trainer.fit(tiny_ddpm(learning_rate=1e-2), digits(16, 8), digits(20, 10, seed=1))

    last_bucket = [record["val_loss_per_bucket"][-1] for record in callback.history]
    assert len(last_bucket) == 2 and None not in last_bucket and last_bucket[0] != last_bucket[1]
    assert stop.stopped_epoch == 1 and trainer.current_epoch == 2 and trainer.global_step == 4
    assert stop.best_score.item() == pytest.approx(last_bucket[0], rel=1e-6)  # the first one, the only improvement
    # the checkpoint keeps the epoch whose last bucket was lowest, scored by it
    winner = min(range(2), key=last_bucket.__getitem__)
    assert best.best_model_score.item() == pytest.approx(last_bucket[winner], rel=1e-6)
    assert best.best_model_path == str(tmp_path / "ckpt" / f"epoch={winner}.ckpt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [f"epoch={winner}.ckpt"]


# ---------------------------------------------------------------------- checkpoints


def resumable_run(tmp_path, callbacks=(), num_buckets: int = 4):
    outputs, callback = Outputs(), TimestepLossLogger(num_buckets=num_buckets)
    logger = CSVLogger(tmp_path, name="csv")
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, logger=logger, log_every_n_steps=2, limit_val_batches=2, enable_checkpointing=True,
        callbacks=[outputs, callback, checkpoint, *callbacks],
    )  # fmt: skip
    # every training batch holds the same images, so the loader restarting its epoch on resume changes nothing
    train = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([RandomDigits(4)] * 3), batch_size=4)

    def fit(**kwargs):
        torch.manual_seed(0)
        trainer.fit(tiny_ddpm(num_train_timesteps=100), train, digits(8, 4, seed=1), **kwargs)

    return fit, callback, logger


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resuming_mid_epoch_gives_the_history_and_logs_of_an_uninterrupted_run(tmp_path):
    fit, reference, reference_logger = resumable_run(tmp_path / "a")
    fit()

    fit, _, _ = resumable_run(tmp_path / "b", callbacks=[CrashAt(6)])
    with pytest.raises(Crash):
        fit()
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # what Trainer.fit(ckpt_path=...) must be able to read
    assert saved["global_step"] == 5  # mid-epoch 1, one batch after a training log: a window open
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("TimestepLossLogger")]
    assert state["epoch_index"] == 1 and state["window"]["counts"].sum() == 4 and state["epoch"]["counts"].sum() == 8
    assert len(state["history"]) == 1

    fit, resumed, resumed_logger = resumable_run(tmp_path / "b")
    fit(ckpt_path=last)
    assert resumed.history == reference.history and len(resumed.history) == 2
    # the log after the restart covers the batch before it too, as if never interrupted
    (after,) = [r for r in read_csv(resumed_logger) if "train/loss" in r]
    (same,) = [r for r in read_csv(reference_logger) if r["step"] == after["step"] and "train/loss" in r]
    assert after == pytest.approx(same, rel=1e-6)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_a_checkpoint_with_other_buckets_warns_and_is_not_restored(tmp_path):
    fit, _, _ = resumable_run(tmp_path / "a", callbacks=[CrashAt(6)])
    with pytest.raises(Crash):
        fit()
    fit, other, _ = resumable_run(tmp_path / "b", num_buckets=5)
    with pytest.warns(UserWarning, match=r"buckets \[\(0, 24\).*\(80, 99\)\]; its history is not restored"):
        fit(ckpt_path=tmp_path / "a" / "ckpt" / "last.ckpt")
    # only what this run saw: the last batch of epoch 1, not the restored epoch 0 or the first two of epoch 1
    assert [r["epoch"] for r in other.history] == [1]
    assert other.bucket_edges == bucket_edges(5, 100)


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize("num_buckets", [0, -1, 2.5, True, "10"])
def test_bad_num_buckets_raise_a_value_error_naming_the_field(num_buckets):
    with pytest.raises(ValueError, match=r"^num_buckets="):
        TimestepLossLogger(num_buckets=num_buckets)


def test_more_buckets_than_timesteps_raise_at_setup_naming_both(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[TimestepLossLogger(num_buckets=101)])
    with pytest.raises(ValueError, match=r"num_buckets=101 .*num_train_timesteps=100"):
        trainer.fit(tiny_ddpm(num_train_timesteps=100), digits(4, 4))
    assert trainer.global_step == 0


def test_a_module_that_is_not_a_diffusion_module_raises(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[TimestepLossLogger()])
    with pytest.raises(ValueError, match="TimestepLossLogger needs a DiffusionModule, got BoringModel"):
        trainer.fit(BoringModel())
