"""``last.ckpt`` is the run's latest state after every validation, whether or not the loss improved."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lightning.callbacks.checkpoint import BestAndLastCheckpoint
from diffusion_lightning.cli import DiffusionCLI


class WorseningModel(LightningModule):
    """A linear model whose logged ``val/loss`` grows every epoch: only the first is ever the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=4)


def fit(tmp_path, callback: ModelCheckpoint) -> dict:
    trainer = Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(WorseningModel())
    return torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)


def options(tmp_path) -> dict:
    return dict(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1, save_last=True, filename="best")


def test_last_checkpoint_holds_the_final_step_when_the_loss_stops_improving(tmp_path):
    callback = BestAndLastCheckpoint(**options(tmp_path))
    last = fit(tmp_path, callback)
    assert last["global_step"] == 6 and last["epoch"] == 2  # 3 epochs of 2 steps
    best = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == 2  # the first epoch's, the only improvement
    assert callback.best_model_score == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_plain_model_checkpoint_keeps_a_stale_last_checkpoint(tmp_path):
    """What the subclass fixes (Lightning >= 2.6): last.ckpt is written only with a top-k save."""
    last = fit(tmp_path, ModelCheckpoint(**options(tmp_path)))
    assert last["global_step"] == 2


def test_the_cli_checkpoint_group_is_the_subclass(tmp_path):
    cli = DiffusionCLI(
        args=["--config", "configs/smoke/ddpm_mnist.yaml", "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    assert type(cli.trainer.checkpoint_callback) is BestAndLastCheckpoint
