"""LR schedules: an extended run follows its new horizon; plateau schedulers; top-level optimizer flags refused."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import ReduceLROnPlateau
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from diffusion_lightning import WarmupCosineLR
from diffusion_lightning.cli import DiffusionCLI
from diffusion_lightning.optim import optimizer_config
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE = str(REPO / "configs/smoke/ddpm_mnist.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def trainer_of(steps, check_val_every_n_epoch=1):
    return SimpleNamespace(estimated_stepping_batches=steps, check_val_every_n_epoch=check_val_every_n_epoch)


def cosine(total, warmup=2):
    return WarmupCosineLR(optimizer(), warmup_steps=warmup, total_steps=total)


# ---------------------------------------------------------------------- extending a run


def test_a_restored_cosine_keeps_its_own_length_and_sets_the_lr_of_the_restored_step():
    first = cosine(8)
    for _ in range(8):
        first.optimizer.step()
        first.step()
    assert first.get_last_lr() == [0.0]  # the end of the first run's schedule
    state = {"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()}

    extended = cosine(16)  # the resumed Trainer's horizon
    extended.optimizer.load_state_dict(state["optimizer"])  # Lightning restores the optimizer first: its LR is 0
    extended.load_state_dict(state["scheduler"])
    assert extended.last_epoch == 8 and extended.total_steps == 16
    assert extended.get_last_lr() == [extended.factor(8)] == [extended.optimizer.param_groups[0]["lr"]]
    assert extended.factor(8) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 6 / 14)).item()))

    same = cosine(8)  # an ordinary resume: exactly the LR the uninterrupted schedule had
    same.optimizer.load_state_dict(state["optimizer"])
    same.load_state_dict(state["scheduler"])
    assert same.get_last_lr() == first.get_last_lr() and same.optimizer.param_groups[0]["lr"] == 0.0


def test_an_unsized_cosine_takes_the_restored_length():
    """Outside a Trainer nothing sizes the schedule: the checkpoint's length is kept rather than dropped."""
    first = cosine(8)
    restored = WarmupCosineLR(optimizer(), warmup_steps=2)
    restored.load_state_dict(first.state_dict())
    assert restored.total_steps == 8


def test_optimizer_config_sizes_the_cosine_from_the_trainer_and_refuses_one_that_ends_at_zero_early():
    scheduler = optimizer_config(optimizer(), lambda opt: WarmupCosineLR(opt, warmup_steps=2), trainer_of(16))
    assert scheduler["lr_scheduler"]["scheduler"].total_steps == 16
    assert scheduler["lr_scheduler"]["interval"] == "step"
    message = r"total_steps=8 ends before the Trainer's 16 .* the last 8 would train at LR 0"
    with pytest.raises(ValueError, match=message):
        optimizer_config(optimizer(), lambda opt: WarmupCosineLR(opt, total_steps=8), trainer_of(16))
    with_floor = lambda opt: WarmupCosineLR(opt, total_steps=8, min_lr_ratio=0.1)  # noqa: E731
    floor = optimizer_config(optimizer(), with_floor, trainer_of(16))
    assert floor["lr_scheduler"]["scheduler"].total_steps == 8  # a floor above 0 is a choice, kept


def lr_and_val_loss(folder):
    """``{tag: {step: value}}`` of the LR and val/loss scalars over every event file of a TensorBoard version."""
    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith("lr-") or tag == "val/loss":
                scalars.setdefault(tag, {}).update({event.step: event.value for event in events.Scalars(tag)})
    return scalars


def test_readme_extend_example_trains_the_extra_epochs_at_a_non_zero_lr(tmp_path):
    base = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path)]
    base += ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]
    base += ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"]
    DiffusionCLI(args=base)  # max_epochs 2: 8 steps, the cosine ends at LR 0
    DiffusionCLI(args=[*base, "--trainer.max_epochs", "4", "--ckpt_path", "last"])  # the README's extension

    scalars = lr_and_val_loss(tmp_path / "lightning_logs" / "version_0")
    lr_tags = [tag for tag in scalars if tag.startswith("lr-")]
    assert lr_tags  # one per parameter group
    reference = WarmupCosineLR(optimizer(1e-3), warmup_steps=2, total_steps=16)  # the config's schedule over 4 epochs
    for tag in lr_tags:
        assert sorted(scalars[tag]) == list(range(16))
        extra = [scalars[tag][step] for step in range(8, 16)]
        assert all(lr > 0 for lr in extra), extra
        assert extra == pytest.approx([1e-3 * reference.factor(step) for step in range(8, 16)], rel=1e-5)
    val = [value for _, value in sorted(scalars["val/loss"].items())]
    assert len(val) == 4 and val[2] != val[1] and val[3] != val[2]  # the extra epochs moved the weights

    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 16 and last["lr_schedulers"][0]["total_steps"] == 16


# ---------------------------------------------------------------------- plateau


def test_plateau_scheduler_needs_a_monitor_and_steps_on_it_after_validation():
    config = optimizer_config(optimizer(), lambda opt: ReduceLROnPlateau(opt, monitor="val/loss"), trainer_of(8, 3))
    assert {k: v for k, v in config["lr_scheduler"].items() if k != "scheduler"} == {
        "monitor": "val/loss",
        "interval": "epoch",
        "frequency": 3,  # every epoch that validates
    }
    with pytest.raises(ValueError, match=r"torch\.optim\.lr_scheduler\.ReduceLROnPlateau has no metric to watch"):
        optimizer_config(optimizer(), torch.optim.lr_scheduler.ReduceLROnPlateau, trainer_of(8))


class RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize(("val_losses", "factors"), [([1.0] * 4, [1, 1, 0.5, 0.25]), ([4.0, 3.0, 2.0, 1.0], [1] * 4)])
def test_plateau_lowers_the_lr_of_every_parameter_group_when_val_loss_stalls(tmp_path, val_losses, factors):
    model = tiny_ddpm(
        learning_rate=1e-3,
        lr_scheduler=lambda opt: ReduceLROnPlateau(opt, monitor="val/loss", patience=0, factor=0.5),
    )

    def validation_step(batch, batch_idx):  # a scripted val/loss per epoch
        model.log("val/loss", torch.tensor(val_losses[model.current_epoch]), batch_size=8)

    model.validation_step = validation_step
    record = RecordLR()
    trainer = quiet_trainer(tmp_path, max_epochs=4, limit_train_batches=1, num_sanity_val_steps=0, callbacks=[record])
    data = DataLoader(RandomDigits(n=8), batch_size=8)
    trainer.fit(model, data, data)
    assert [len(groups) for groups in record.lrs] == [2] * 4  # the module's groups (no decay on biases and norms)
    assert record.lrs == [[pytest.approx(1e-3 * f)] * 2 for f in factors]


def test_plateau_from_the_command_line(tmp_path):
    plateau = "{class_path: lightning.pytorch.cli.ReduceLROnPlateau, init_args: {monitor: val/loss, patience: 0}}"
    cli = DiffusionCLI(args=["--config", SMOKE, "--model.init_args.lr_scheduler", plateau], run=False)
    opt = cli.model.optimizer_factory(cli.model.parameter_groups())
    config = optimizer_config(opt, cli.model.lr_scheduler_factory, trainer_of(8))
    assert config["lr_scheduler"]["monitor"] == "val/loss" and config["lr_scheduler"]["interval"] == "epoch"
    assert len(config["optimizer"].param_groups) == 2


# ---------------------------------------------------------------------- LightningCLI's top-level flags


@pytest.mark.parametrize(
    ("flags", "instead"),
    [
        (["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"], "--model.init_args.lr_scheduler"),
        (["--optimizer", "SGD", "--optimizer.lr", "0.1"], "--model.init_args.optimizer"),
    ],
)
def test_top_level_optimization_flags_are_refused_for_the_package_modules(capsys, flags, instead):
    with pytest.raises(SystemExit) as info:
        DiffusionCLI(args=["--config", SMOKE, *flags], run=False)
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "(top level) cannot apply to diffusion_lightning.modules.ddpm.ClassConditionedDDPM" in error
    assert f"set {instead} instead" in error


class Plain(LightningModule):
    """A model without configure_optimizers, for which LightningCLI's top-level flags are meant."""

    def __init__(
        self, num_classes: int = 10, image_size: int = 28, in_channels: int = 1, class_names: list | None = None
    ) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


PLAIN = ["--model", "tests.test_optim.Plain", "--data", "diffusion_lightning.MNISTDataModule"]


def test_top_level_lr_scheduler_without_optimizer_is_refused(capsys):
    with pytest.raises(SystemExit):
        DiffusionCLI(args=[*PLAIN, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"], run=False)
    assert "--lr_scheduler (top level) takes effect only together with --optimizer" in capsys.readouterr().err


def test_top_level_flags_configure_a_model_without_configure_optimizers():
    cli = DiffusionCLI(
        args=[*PLAIN, "--optimizer", "SGD", "--optimizer.lr", "0.5", "--lr_scheduler", "StepLR"]
        + ["--lr_scheduler.step_size", "1"],
        run=False,
    )
    optimizers, schedulers = cli.model.configure_optimizers()
    assert optimizers[0].param_groups[0]["lr"] == 0.5 and type(schedulers[0]).__name__ == "StepLR"
