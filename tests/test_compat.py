"""``diffusion_lightning.utils.compat``: every private API the package relies on, against the installed versions.

Each test runs the real thing (a tiny Trainer, a real study, a real network) so an upgrade that
moves or changes one of these names fails here, by name.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger

from diffusion_lightning.utils import compat

# ---------------------------------------------------------------------- Lightning: Trainer internals


class _LoggingModel(BoringModel):
    """A boring model that logs a step metric at every training step (and one in validation).

    Args:
        stop_at: The 0-based batch of the first epoch at which it asks the Trainer to stop.
    """

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop_at = stop_at

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        if batch_idx == self.stop_at:
            self.trainer.should_stop = True
        self.log("step_metric", out["loss"], on_step=True, on_epoch=False)
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().validation_step(batch, batch_idx)
        self.log("val_metric", out["x"], on_step=False, on_epoch=True)
        return out


class _RecordingLogger(Logger):
    """A logger that records every ``log_metrics`` call, and the training batch current when the step metric came."""

    def __init__(self, clock: dict[str, int] | None = None) -> None:
        super().__init__()
        self.clock = clock or {"batch": -1}
        self.batches: list[int] = []
        self.steps: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.append((int(step or 0), dict(metrics)))
        if "step_metric" in metrics:
            self.batches.append(self.clock["batch"])


class _Decisions(Callback):
    """Records ``should_update_logs`` at each training batch's start and end, by global batch number."""

    def __init__(self, clock: dict[str, int]) -> None:
        self.clock = clock
        self.at_start: list[int] = []
        self.at_end: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.clock["batch"] += 1
        if compat.should_update_logs(trainer):
            self.at_start.append(self.clock["batch"])

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if compat.should_update_logs(trainer):
            self.at_end.append(self.clock["batch"])


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # every third optimizer step, across two epochs of 5 batches, validation in between
        (dict(log_every_n_steps=3, max_epochs=2, limit_train_batches=5, val_check_interval=2), [3, 6, 9]),
        # gradient accumulation: 2 batches per step, so every 2nd step is the 4th, 8th, ... batch
        (dict(log_every_n_steps=2, max_epochs=1, limit_train_batches=8, accumulate_grad_batches=2), [4, 8]),
        # a stop requested in the 6th step (as early stopping does): Lightning also logs that step
        (dict(log_every_n_steps=4, max_epochs=1, limit_train_batches=10, stop_at=5), [4, 6]),
    ],
)
def test_should_update_logs_agrees_with_what_the_logger_receives(tmp_path, options, expected):
    clock = {"batch": 0}
    logger, decisions = _RecordingLogger(clock), _Decisions(clock)
    model = _LoggingModel(options.pop("stop_at", None))
    options = {"limit_val_batches": 1, **options}
    _trainer(tmp_path, logger=logger, callbacks=[decisions], **options).fit(model)
    assert logger.batches == expected
    assert decisions.at_end == logger.batches
    # from on_train_batch_start the decision is the same, except what only the step itself settles (should_stop)
    assert set(decisions.at_start) <= set(decisions.at_end)


def test_should_update_logs_is_every_step_with_fast_dev_run(tmp_path):
    clock = {"batch": 0}
    decisions = _Decisions(clock)
    received: list[int] = []

    def record(metrics: dict[str, float], step: int | None = None) -> None:
        if "step_metric" in metrics:
            received.append(clock["batch"])

    class Spy(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            for logger in trainer.loggers:  # fast_dev_run swaps every logger for a DummyLogger
                logger.log_metrics = record

    trainer = _trainer(tmp_path, logger=_RecordingLogger(clock), callbacks=[decisions, Spy()], fast_dev_run=3)
    trainer.fit(_LoggingModel())
    assert decisions.at_end == [1, 2, 3]
    assert received == [1, 2, 3]


class _Progress(Callback):
    def __init__(self) -> None:
        self.at_start: list[tuple[int, int]] = []
        self.at_end: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.at_start.append((batch_idx, compat.batches_processed_in_epoch(trainer)))

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.at_end.append((batch_idx, compat.batches_processed_in_epoch(trainer)))


def test_batches_processed_in_epoch_counts_this_epoch_and_continues_after_resume(tmp_path):
    progress = _Progress()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    options = dict(logger=False, max_epochs=2, limit_train_batches=4, limit_val_batches=0, num_sanity_val_steps=0)
    _trainer(tmp_path, callbacks=[progress, saver], **{**options, "enable_checkpointing": True}).fit(BoringModel())
    assert progress.at_start == [(i, i) for i in range(4)] * 2
    assert progress.at_end == [(i, i + 1) for i in range(4)] * 2

    resumed = _Progress()  # from the checkpoint written at step 3: three batches of epoch 0 processed
    _trainer(tmp_path, callbacks=[resumed], **options).fit(BoringModel(), ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert resumed.at_start[0] == (3, 3)
    assert resumed.at_end[:2] == [(3, 4), (0, 1)]


# ---------------------------------------------------------------------- Lightning: fabric utilities


class _SometimesLogs(BoringModel):
    """Logs ``sometimes`` at the first step only, and asks for it to be forgotten at the second."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.log("sometimes", 1.0, on_step=True, on_epoch=False)
        elif batch_idx == 1:
            compat.forget_step_values(self.trainer, {"sometimes"})
        self.log("always", float(batch_idx), on_step=True, on_epoch=False)


def test_forget_step_values_keeps_an_old_value_from_being_logged_again(tmp_path):
    logger = _RecordingLogger()
    trainer = Trainer(default_root_dir=tmp_path, max_steps=3, log_every_n_steps=1, logger=logger, limit_val_batches=0,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_SometimesLogs())
    logged = {step: set(metrics) for step, metrics in logger.steps}
    assert "sometimes" in logged[0] and "always" in logged[1]
    assert "sometimes" not in logged[1] and "sometimes" not in logged[2]  # without forgetting, repeated at 1 and 2


def test_weight_averaging_internals_the_ema_subclass_uses(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    callback = EMAWeightAveraging(decay=0.5)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, callbacks=[callback])  # fmt: skip
    trainer.fit(BoringModel())
    missing = [name for name in compat.WEIGHT_AVERAGING_INTERNALS if not hasattr(callback, name)]
    assert not missing, f"WeightAveraging no longer has {missing}: update callbacks/ema.py"
    assert callback._latest_update_step == 2 and callable(callback._swap_models)


def test_rng_states_round_trip():
    states = compat.rng_states(include_cuda=False)
    assert {"torch", "numpy", "python"} <= set(states)
    first = (torch.rand(3), np.random.rand(3), random.random())
    compat.set_rng_states(states)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_logger_parameter_helpers():
    def no_args() -> int:
        return 3

    def needs_args(x: int) -> int:
        return x

    assert compat.convert_params(argparse.Namespace(a=1)) == {"a": 1}
    assert compat.convert_params(None) == {}
    sanitized = compat.sanitize_callable_params({"f": no_args, "g": needs_args, "n": 1})
    assert sanitized == {"f": 3, "g": "needs_args", "n": 1}
    assert compat.flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert compat.flatten_dict({"a": {"b": 1}}, delimiter=".") == {"a.b": 1}
    assert compat.add_prefix({"x": 1}, "train", "/") == {"train/x": 1}
    assert compat.add_prefix({"x": 1}, "", "/") == {"x": 1}


# ---------------------------------------------------------------------- torchmetrics


def test_inception_features_and_logits_in_one_pass(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    torch.save(RandomInception("random", ["2048"], str(tmp_path / "empty.pth")).state_dict(), tmp_path / "w.pth")
    both = NoTrainInceptionV3("both", ["2048", "logits_unbiased"], str(tmp_path / "w.pth"))
    logits_only = NoTrainInceptionV3("logits", ["logits_unbiased"], str(tmp_path / "w.pth"))
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features, logits = compat.inception_features_and_logits(both, pixels)
        assert features.shape == (2, 2048) and logits.shape == (2, 1008)
        torch.testing.assert_close(features, both(pixels))  # the public forward: the first feature only
        torch.testing.assert_close(logits, logits_only(pixels))


def test_clip_score_update_matches_the_metric(tmp_path):
    from diffusion_lightning.metrics.clip import CLIPScorer
    from tests.assets import write_tiny_clip

    scorer = CLIPScorer(write_tiny_clip(tmp_path / "clip"))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    prompts = ["a zero", "a one", "a two"]
    scores, count = compat.clip_score_update(images, prompts, scorer.metric.model, scorer.metric.processor)
    assert scores.shape == (3,) and count == 3
    scorer.metric.update(images, prompts)  # the public metric accumulates the same per-sample scores
    torch.testing.assert_close(scorer.metric.score, scores.sum())


# ---------------------------------------------------------------------- Optuna and optuna-integration


def test_pruning_keys_are_what_check_pruned_reads(tmp_path):
    optuna = pytest.importorskip("optuna")
    from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    callback = PyTorchLightningPruningCallback(trial, "val/loss")
    assert compat.pruning_trial(callback) is trial

    storage, keys = compat.study_storage(study), compat.pruning_keys()
    storage.set_trial_system_attr(compat.trial_id(trial), keys.intermediate_value, {"4": 0.5})
    storage.set_trial_system_attr(compat.trial_id(trial), keys.pruned, True)
    storage.set_trial_system_attr(compat.trial_id(trial), keys.epoch, 4)
    with pytest.raises(optuna.TrialPruned, match="epoch 4"):
        callback.check_pruned()
    assert study.trials[0].intermediate_values == {4: 0.5}


def test_trial_id_and_study_storage_address_the_trial():
    optuna = pytest.importorskip("optuna")

    study = optuna.create_study()
    study.ask()
    trial = study.ask()
    storage = compat.study_storage(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert storage.get_trial(compat.trial_id(trial)).number == trial.number == 1
    frozen = study.get_trials(deepcopy=False)[1]
    assert compat.trial_id(frozen) == compat.trial_id(trial)
