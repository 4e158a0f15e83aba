"""A NaN or infinite loss stops the run (or skips the step), is never checkpointed, and the summary says failed."""

import json
import math

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from diffusion_lightning.callbacks import GradientActivationWatcher, RunSummary
from diffusion_lightning.cli import DiffusionCLI
from diffusion_lightning.modules.nonfinite import NonFiniteLossError
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE = str(REPO / "configs/smoke/ddpm_mnist.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaders():
    return DataLoader(RandomDigits(n=32), batch_size=8), DataLoader(RandomDigits(n=8, seed=1), batch_size=8)


def poison(model, when):
    """Make the network's output NaN whenever ``when(model)`` holds (so the loss, and then the weights, go NaN)."""
    original = model.forward

    def forward(noisy, timesteps, condition):
        out = original(noisy, timesteps, condition)
        return out * float("nan") if when(model) else out

    model.forward = forward


def strict_json(path):
    """The file parsed as standard JSON: a bare NaN or Infinity fails."""

    def reject(token):
        raise ValueError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def best_checkpoint(tmp_path):
    return ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        save_last=True,
        filename="best-{epoch:03d}-{step:06d}",
        auto_insert_metric_name=False,
    )


def checkpoint_scores(folder):
    """``best_model_score`` recorded in each ``best-*.ckpt``."""
    scores = {}
    for path in sorted(folder.glob("best-*.ckpt")):
        states = torch.load(path, weights_only=False)["callbacks"]
        (state,) = [value for key, value in states.items() if key.startswith("ModelCheckpoint")]
        scores[path.name] = float(state["best_model_score"])
    return scores


class Snapshot(Callback):
    def __init__(self):
        self.weights = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------- stop (the default)


def test_diverged_cli_run_stops_naming_step_and_loss_and_is_never_best(tmp_path):
    """The reported run: the smoke config (RunSummary, best checkpoint on val/loss) with a diverging learning rate."""
    args = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.enable_progress_bar", "false", "--model.init_args.learning_rate", "1e6"]
    with pytest.raises(NonFiniteLossError, match=r"at global step \d+ \(epoch 0\): train/loss is nan") as info:
        DiffusionCLI(args=args)
    assert info.value.stage == "train" and math.isnan(info.value.loss)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # nothing was saved, least of all as the best
    summary = strict_json(tmp_path / "metrics.json")
    assert summary["status"] == "failed"
    step = info.value.global_step
    assert summary["error"].startswith(f"NonFiniteLossError: Non-finite training loss at global step {step}")
    assert summary["best_model_path"] is None and summary["best_model_score"] is None
    # at the command line: one error line saying what to change, not a traceback
    from diffusion_lightning.errors import user_error

    reported = user_error(info.value)
    assert reported is not None and reported.message.startswith("error: Non-finite training loss at global step")
    assert "lower the learning rate" in reported.message


def test_nan_loss_stops_before_the_step_and_before_any_nan_checkpoint(tmp_path):
    model = tiny_ddpm()
    poison(model, lambda m: m.training and m.trainer.global_step >= 1)
    snapshot = Snapshot()
    summary = RunSummary(log_description=False, summary_figure=False)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=4,
        enable_checkpointing=True,
        callbacks=[best_checkpoint(tmp_path), summary, snapshot],
    )
    with pytest.raises(NonFiniteLossError, match=r"global step 1 \(epoch 0\): train/loss is nan\. Training stops"):
        trainer.fit(model, *loaders())
    assert trainer.global_step == 1 and same(snapshot.weights[1], model.parameters())  # step 1 changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert checkpoint_scores(tmp_path / "checkpoints") == {}  # epoch 0's validation would have been NaN
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    written = strict_json(tmp_path / "metrics.json")
    assert written["status"] == "failed" and "global step 1" in written["error"]


def test_nan_validation_loss_stops_before_the_checkpoints(tmp_path):
    model = tiny_ddpm()
    poison(model, lambda m: not m.training and m.trainer.current_epoch >= 1 and not m.trainer.sanity_checking)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        enable_checkpointing=True,
        callbacks=[best_checkpoint(tmp_path), RunSummary(log_description=False, summary_figure=False)],
    )
    with pytest.raises(NonFiniteLossError, match=r"validation loss in 1 of 1 batches at global step 4 \(epoch 1\)"):
        trainer.fit(model, *loaders())
    scores = checkpoint_scores(tmp_path / "checkpoints")
    assert list(scores) == ["best-000-000002.ckpt"] and math.isfinite(scores["best-000-000002.ckpt"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert strict_json(tmp_path / "metrics.json")["status"] == "failed"


def test_nan_in_the_sanity_check_stops_before_training(tmp_path):
    model = tiny_ddpm()
    poison(model, lambda m: not m.training)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, limit_train_batches=2, enable_checkpointing=True, callbacks=[best_checkpoint(tmp_path)]
    )
    with pytest.raises(NonFiniteLossError, match=r"global step 0 \(the sanity check\): val/loss is nan"):
        trainer.fit(model, *loaders())
    assert trainer.global_step == 0 and checkpoint_scores(tmp_path / "checkpoints") == {}


def test_a_failure_on_another_process_stops_every_process(tmp_path):
    """The decision is reduced over the processes: a finite loss here still stops when another process's was not."""
    model = tiny_ddpm()
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[OtherProcessFailsAt(2)])
    with pytest.raises(NonFiniteLossError, match="on another process at global step 2") as info:
        trainer.fit(model, loaders()[0])
    assert math.isfinite(info.value.loss)


class OtherProcessFailsAt(Callback):
    """Make the strategy's all-process vote fail at one step, as if another process had a NaN loss."""

    def __init__(self, step):
        self.step = step

    def on_train_start(self, trainer, pl_module):
        reduce = trainer.strategy.reduce_boolean_decision

        def reduce_boolean_decision(decision, all=True):  # noqa: A002 (Lightning's name)
            return False if all and trainer.global_step == self.step else reduce(decision, all=all)

        trainer.strategy.reduce_boolean_decision = reduce_boolean_decision


# ---------------------------------------------------------------------- skip


def test_skip_leaves_the_weights_of_the_skipped_step_and_goes_on(tmp_path):
    model = tiny_ddpm(nonfinite_loss="skip")
    poison(model, lambda m: m.training and m.trainer.global_step == 2)
    snapshot = Snapshot()
    summary = RunSummary(log_description=False, summary_figure=False)
    trainer = quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[snapshot, summary])
    warning = r"global step 2 \(epoch 0\): train/loss is nan\. Skipping this optimizer step \(1 skipped so far\)"
    with pytest.warns(UserWarning, match=warning):
        trainer.fit(model, loaders()[0])
    assert trainer.global_step == 6 and model.skipped_nonfinite_steps == 1
    assert same(snapshot.weights[2], snapshot.weights[3])  # the skipped step changed nothing
    assert not same(snapshot.weights[3], snapshot.weights[4])  # the next one trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
    written = strict_json(tmp_path / "metrics.json")
    assert written["status"] == "finished" and written["skipped_nonfinite_steps"] == 1

    trainer.save_checkpoint(tmp_path / "skip.ckpt")
    restored = type(model).load_from_checkpoint(tmp_path / "skip.ckpt")
    assert restored.nonfinite_loss == "skip" and restored.skipped_nonfinite_steps == 1


def test_skip_agrees_with_the_other_processes(tmp_path):
    model = tiny_ddpm(nonfinite_loss="skip")
    snapshot = Snapshot()
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[OtherProcessFailsAt(2), snapshot])
    with pytest.warns(UserWarning, match="on another process at global step 2"):
        trainer.fit(model, loaders()[0])
    assert model.skipped_nonfinite_steps == 1 and same(snapshot.weights[2], snapshot.weights[3])


def test_skip_cannot_recover_non_finite_weights(tmp_path):
    model = tiny_ddpm(nonfinite_loss="skip")

    class PoisonWeights(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                with torch.no_grad():
                    pl_module.unet.conv_in.weight[0, 0, 0, 0] = float("nan")

    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[PoisonWeights()])
    with pytest.raises(NonFiniteLossError, match="global step 1 .* weights themselves are non-finite"):
        trainer.fit(model, loaders()[0])


def test_a_step_the_watcher_skipped_is_left_alone(tmp_path):
    """GradientActivationWatcher(skip_nonfinite=True) runs first and drops the step; the module's default lets it."""
    model = tiny_ddpm()
    poison(model, lambda m: m.training and m.trainer.global_step == 2)
    watcher = GradientActivationWatcher(watch=[], skip_nonfinite=True)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[watcher])
    with pytest.warns(UserWarning, match="global step 2"):
        trainer.fit(model, loaders()[0])
    assert trainer.global_step == 4 and watcher.skipped_steps == 1 and model.skipped_nonfinite_steps == 0


def test_nonfinite_loss_mode_is_checked_for_python_callers():
    message = r"nonfinite_loss='ignore' is not supported; expected one of \['raise', 'skip'\]"
    with pytest.raises(ValueError, match=message):
        tiny_ddpm(nonfinite_loss="ignore")


# ---------------------------------------------------------------------- the summary of a module without the guard


class Diverging(LightningModule):
    """No guard of its own: its validation loss is NaN, as a diverged model's is."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch).mean() * float("nan"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_summary_of_a_run_that_ends_with_a_nan_monitor_says_failed(tmp_path):
    data = DataLoader(torch.randn(8, 4), batch_size=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[RunSummary(log_description=False, summary_figure=False)])
    trainer.fit(Diverging(), data, data)
    written = strict_json(tmp_path / "metrics.json")
    assert written["status"] == "failed"
    assert written["error"] == "the monitored metric val/loss is nan at the end of fitting (global step 2)"
    assert written["metrics"]["val/loss"] is None and written["nonfinite_metrics"] == {"val/loss": "nan"}
    assert math.isfinite(written["metrics"]["train/loss"])
