"""RunSummary: the run description sent to loggers at train start and the JSON written at fit end."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from torchmetrics.aggregation import MeanMetric

from diffusion_lightning.callbacks.run_info import describe_components, parameter_table, summary_figure
from diffusion_lightning.callbacks.summary import RunSummary
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm


def events_of(logger: TensorBoardLogger) -> EventAccumulator:
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def text(events: EventAccumulator, key: str) -> str:
    return events.Tensors(f"{key}/text_summary")[0].tensor_proto.string_val[0].decode()


def fit(tmp_path, callbacks, logger=None, **kwargs):
    torch.manual_seed(0)
    module = tiny_ddpm()
    data = torch.utils.data.DataLoader(RandomDigits(8), batch_size=8)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=logger or False, callbacks=callbacks)
    trainer.fit(module, data, **kwargs)
    return module


def test_components_are_counted_per_child_network_without_metrics():
    module = torch.nn.Module()
    module.encoder = torch.nn.Linear(3, 4)  # 16 parameters
    module.head = torch.nn.Linear(4, 2)  # 10 parameters, frozen
    module.head.requires_grad_(False)
    module.metric = MeanMetric()
    components = describe_components(module)
    assert components == {
        "encoder": {"class": "Linear", "params_total": 16, "params_trainable": 16},
        "head": {"class": "Linear", "params_total": 10, "params_trainable": 0},
        "total": {"class": "Module", "params_total": 26, "params_trainable": 16},
    }
    assert parameter_table(components).splitlines() == [
        "component  class   params_total  params_trainable",
        "encoder    Linear            16                16",
        "head       Linear            10                 0",
        "total      Module            26                16",
    ]


def test_fit_logs_the_run_description_and_writes_it_to_the_json(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    cli_config = "trainer:\n  max_steps: 1\nmodel:\n  learning_rate: 0.001\n"
    log_dir = tmp_path / "tb" / "version_0"
    assert logger.log_dir == str(log_dir)  # the version is fixed before its folder exists
    log_dir.mkdir(parents=True)
    (log_dir / "config.yaml").write_text(cli_config)  # as LightningCLI saves it
    module = fit(tmp_path, [RunSummary()], logger)

    unet_params = sum(p.numel() for p in module.unet.parameters())
    events = events_of(logger)
    assert events.Scalars("config/net/unet/params_total")[0].value == unet_params
    assert events.Scalars("config/net/unet/params_trainable")[0].value == unet_params
    assert events.Scalars("config/net/total/params_total")[0].value == unet_params
    assert "UNet2DModel" in text(events, "config/components")
    scheduler_text = text(events, "config/noise_scheduler")
    assert '"class": "DDPMScheduler"' in scheduler_text and '"num_train_timesteps": 1000' in scheduler_text
    assert cli_config in text(events, "config/cli")
    # TensorBoard's HParams view shows a run's last record: it has the module's and the description's
    sessions = [
        plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
        for path in log_dir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/session_start_info"
    ]
    hparams = sessions[-1].hparams
    assert hparams["noise_scheduler/num_train_timesteps"].number_value == 1000
    assert hparams["noise_scheduler/beta_schedule"].string_value == "linear"
    assert hparams["config/net/unet/params_total"].number_value == unet_params
    assert hparams["p_uncond"].number_value == pytest.approx(module.p_uncond)

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 1
    assert summary["components"]["unet"] == {
        "class": "UNet2DModel",
        "params_total": unet_params,
        "params_trainable": unet_params,
    }
    public = {k: v for k, v in module.noise_scheduler.config.items() if not k.startswith("_")}
    assert summary["noise_scheduler"] == {"class": "DDPMScheduler", **public}
    assert summary["cli_config"] == str(log_dir / "config.yaml")
    assert "diffusion" not in summary  # no callback with per-epoch records in this run


def test_description_can_stay_out_of_the_loggers(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [RunSummary(log_description=False)], logger)
    events = events_of(logger)
    assert not [tag for kind in ("scalars", "tensors") for tag in events.Tags()[kind] if tag.startswith("config/")]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["components"]["unet"]["params_total"] > 0 and summary["cli_config"] is None


class _Fail(Callback):
    def on_train_batch_end(self, *args):
        raise RuntimeError("broken step")


def test_failed_run_still_writes_its_summary(tmp_path):
    with pytest.raises(RuntimeError, match="broken step"):
        fit(tmp_path, [RunSummary(path=str(tmp_path / "out" / "run.json")), _Fail()])
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["status"] == "failed" and summary["components"]["unet"]["class"] == "UNet2DModel"


def test_summary_figure_draws_what_the_history_has():
    empty = summary_figure([], [])
    assert len(empty.axes) == 4
    assert all([t.get_text() for t in axes.texts] == ["no data"] for axes in empty.axes)
    history = [
        {"epoch": 0, "step": 2, "train_loss_per_bucket": [1.0, None, 0.5], "seconds_per_image": 0.2},
        {"epoch": 1, "step": 4, "train_loss_per_bucket": [0.9, 0.7, 0.4], "val_loss_per_bucket": [1.0, 0.8, 0.5]},
    ]
    figure = summary_figure(history, [(0, 3), (4, 6), (7, 9)])
    loss, seconds, memory, latent = figure.axes
    assert [len(line.get_xdata()) for line in loss.lines] == [2, 3, 3]  # the empty bucket is skipped
    assert list(loss.lines[0].get_xdata()) == [1.5, 8.0]
    assert list(seconds.lines[0].get_ydata()) == [0.2]
    assert [t.get_text() for t in memory.texts] == ["no data"] and [t.get_text() for t in latent.texts] == ["no data"]
