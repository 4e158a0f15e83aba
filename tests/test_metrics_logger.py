"""The deprecated DiffusionMetricsLogger (a composite of the split callbacks) and the AsyncWriter."""

import io
import json
import threading

import PIL.Image
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning.callbacks import GenerationMonitor, TimestepLossLogger
from diffusion_lightning.callbacks.metrics import DiffusionMetricsLogger
from diffusion_lightning.callbacks.summary import RunSummary
from diffusion_lightning.utils.async_writer import AsyncWriter
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm

pytestmark = pytest.mark.filterwarnings("ignore:DiffusionMetricsLogger is deprecated")

# ---------------------------------------------------------------------- building it


def test_building_it_warns_a_deprecation_and_builds_the_parts():
    with pytest.warns(DeprecationWarning, match="DiffusionMetricsLogger is deprecated: list TimestepLossLogger"):
        callback = DiffusionMetricsLogger(num_buckets=4, num_samples=2, seed=3)
    timestep_loss, generation = callback.parts
    assert isinstance(timestep_loss, TimestepLossLogger) and timestep_loss.num_buckets == 4
    assert isinstance(generation, GenerationMonitor) and (generation.num_samples, generation.seed) == (2, 3)
    assert DiffusionMetricsLogger(log_diffusion_metrics=False, generate_every_n_epochs=None).parts == []
    with pytest.warns(UserWarning, match="log_every_n_steps=...\\) is ignored"):
        DiffusionMetricsLogger(log_every_n_steps=10)


def test_callback_is_built_from_yaml_with_its_old_arguments():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_string(
        "callback:\n  class_path: diffusion_lightning.callbacks.metrics.DiffusionMetricsLogger\n"
        "  init_args: {num_buckets: 5, classes: [1, 2], log_latent_space: false, generate_every_n_epochs: 2,\n"
        "    num_samples: 4, trajectory_num_steps: 3, save_images: false, summary_figure: false, seed: 9}\n"
    )
    callback = parser.instantiate(config).callback
    assert isinstance(callback, DiffusionMetricsLogger)
    assert callback.timestep_loss.num_buckets == 5 and callback.evaluation is None
    generation = callback.generation
    assert (generation.classes, generation.log_latent_space, generation.every_n_epochs) == ([1, 2], False, 2)
    assert (generation.num_samples, generation.trajectory_num_steps, generation.save_images) == (4, 3, False)
    assert generation.seed == 9 and generation.log_generation_steps is True


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_buckets=0), "num_buckets"),
        (dict(generate_every_n_epochs=0), "generate_every_n_epochs"),
        (dict(evaluate_every_n_epochs=0), "evaluate_every_n_epochs"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(trajectory_num_steps=0), "trajectory_num_steps"),
        (dict(queue_size=0), "queue_size"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(classes=[]), "classes"),
        (dict(scheduler="nope"), "scheduler"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"(^|: ){field}="):
        DiffusionMetricsLogger(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_buckets=101), r"num_buckets=101 .*num_train_timesteps=100"),
        (dict(classes=[0, 3]), r"classes=\[0, 3\]"),
    ],
)
def test_arguments_checked_against_the_model_at_setup(tmp_path, kwargs, message):
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[DiffusionMetricsLogger(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(tiny_ddpm(num_train_timesteps=100), torch.utils.data.DataLoader(RandomDigits(4), batch_size=4))


# ---------------------------------------------------------------------- a real run


def run(tmp_path, epochs: int = 1, logger=False, **kwargs):
    torch.manual_seed(0)
    module = tiny_ddpm(num_train_timesteps=100, num_inference_steps=2, sampler="ddim")
    callback = DiffusionMetricsLogger(num_buckets=4, num_samples=3)
    data = torch.utils.data.DataLoader(RandomDigits(16), batch_size=8)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = quiet_trainer(
        tmp_path, max_epochs=epochs, logger=logger, log_every_n_steps=1, limit_val_batches=1,
        enable_checkpointing=True, callbacks=[callback, RunSummary(), checkpoint],
    )  # fmt: skip
    trainer.fit(module, data, data, **kwargs)
    return callback, trainer


def test_fit_logs_what_its_parts_log_and_run_summary_draws_it(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback, trainer = run(tmp_path, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])

    def value(tag):
        return events.Scalars(tag)[-1].value

    buckets = ["t00-24", "t25-49", "t50-74", "t75-99"]
    assert [len(events.Scalars("diffusion/loss"))] == [2]  # both steps, at log_every_n_steps=1
    assert {f"val/loss_{name}" for name in buckets} <= scalars  # the new names, monitorable
    (record,) = callback.timestep_loss.history
    for name, mean in zip(buckets, record["val_loss_per_bucket"]):
        assert value(f"val/loss_{name}") == pytest.approx(mean)
    assert any(tag.startswith("diffusion/loss_t") for tag in scalars)
    (generation,) = callback.generation.history
    assert value("generation/num_inference_steps") == 2 and value("generation/guidance_scale") == 2.0
    assert value("generation/seconds_per_image") == pytest.approx(generation["seconds_per_image"])
    assert value("latent/std") == pytest.approx(generation["latent_std"])
    assert {"generation/samples", "generation/trajectory", "diffusion/summary"} <= set(events.Tags()["images"])
    assert "latent/values" in events.Tags()["histograms"]
    assert (tmp_path / "generation" / "epoch=0" / "samples.png").is_file()

    png = (tmp_path / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    PIL.Image.open(io.BytesIO(png)).verify()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "finished"
    assert summary["diffusion"]["timestep_buckets"] == [[0, 24], [25, 49], [50, 74], [75, 99]]
    (epoch,) = summary["diffusion"]["epochs"]  # the parts' records, merged by epoch
    assert epoch["train_loss_per_bucket"] == pytest.approx(record["train_loss_per_bucket"])
    assert epoch["val_loss_per_bucket"] == pytest.approx(record["val_loss_per_bucket"])
    for key in ("seconds_per_image", "peak_memory_mb", "latent_mean", "latent_std", "latent_min", "latent_max"):
        assert epoch[key] == pytest.approx(generation[key]), key
    assert epoch["step"] == 2


def test_its_state_travels_in_checkpoints(tmp_path):
    first, _ = run(tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]["DiffusionMetricsLogger"]
    assert set(saved) == {"TimestepLossLogger", "GenerationMonitor"}
    assert saved["TimestepLossLogger"]["history"] == first.timestep_loss.history
    assert saved["GenerationMonitor"]["history"] == first.generation.history

    resumed, _ = run(tmp_path / "a", epochs=2, ckpt_path=tmp_path / "a" / "ckpt" / "last.ckpt")
    assert resumed.timestep_loss.history[0] == first.timestep_loss.history[0]
    assert resumed.generation.history[0] == first.generation.history[0]
    assert [r["epoch"] for r in resumed.epoch_records()] == [0, 1, 0, 1]  # each part's records, both epochs


# ---------------------------------------------------------------------- the background writer


def test_async_writer_runs_every_job_in_order_through_a_small_queue():
    done = []
    with AsyncWriter(maxsize=2) as writer:
        for i in range(100):
            writer.submit(done.append, i)
        writer.drain()
        assert done == list(range(100))
    assert writer.closed
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(done.append, 0)


def test_async_writer_blocks_the_producer_when_full():
    started, release, done = threading.Event(), threading.Event(), []
    writer = AsyncWriter(maxsize=2)
    writer.submit(lambda: (started.set(), release.wait(5)))
    assert started.wait(5)
    writer.submit(done.append, 1)
    writer.submit(done.append, 2)  # the queue is full now
    producer = threading.Thread(target=writer.submit, args=(done.append, 3))
    producer.start()
    producer.join(0.3)
    assert producer.is_alive() and done == []
    release.set()
    producer.join(5)
    writer.close()
    assert done == [1, 2, 3]


def test_async_writer_reraises_a_failed_job_on_drain():
    done = []
    writer = AsyncWriter(maxsize=2)
    writer.submit(lambda: 1 / 0)
    writer.submit(done.append, "after")
    with pytest.raises(ZeroDivisionError):
        writer.drain()
    assert done == ["after"]  # a failure does not stop the worker
    writer.drain()  # reported once
    writer.close()
    with pytest.raises(ValueError, match="maxsize=0"):
        AsyncWriter(maxsize=0)
