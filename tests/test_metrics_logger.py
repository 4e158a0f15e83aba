"""DiffusionMetricsLogger: loss per timestep bucket, generation metrics, media, state; and AsyncWriter."""

import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning.callbacks.metrics import DiffusionMetricsLogger
from diffusion_lightning.callbacks.run_info import LatentRecorder, TimestepBucketLoss
from diffusion_lightning.callbacks.summary import RunSummary
from diffusion_lightning.utils.async_writer import AsyncWriter
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm

# ---------------------------------------------------------------------- helpers


class RecordingLogger:
    """Stands in for a logger: records scalars, image keys and histogram keys."""

    def __init__(self) -> None:
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.media: list[str] = []

    def log_metrics(self, metrics, step):
        self.scalars.append((step, dict(metrics)))

    def log_image(self, key, images, step):
        self.media.append(key)

    def log_histogram(self, key, values, step):
        self.media.append(key)

    def keys(self) -> set[str]:
        return {k for _, metrics in self.scalars for k in metrics} | set(self.media)


def stub_trainer(tmp_path, callback, **overrides):
    """What the callback reads from a Trainer, on one process (reduce is the identity)."""
    fields = dict(
        strategy=SimpleNamespace(reduce=lambda tensor, reduce_op="mean": tensor),
        global_step=0,
        current_epoch=0,
        is_global_zero=True,
        loggers=[RecordingLogger()],
        log_every_n_steps=50,
        callbacks=[callback],
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        default_root_dir=str(tmp_path),
    )
    return SimpleNamespace(**{**fields, **overrides})


def batch(losses, timesteps):
    losses = torch.tensor(losses, dtype=torch.float32)
    return {"loss": losses.mean(), "per_sample_loss": losses, "timesteps": torch.tensor(timesteps)}


def train_batches(callback, trainer, module, batches, first_step=1):
    for step, outputs in enumerate(batches, start=first_step):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, outputs, None, step - 1)


def no_generation(**kwargs) -> DiffusionMetricsLogger:
    return DiffusionMetricsLogger(generate_every_n_epochs=None, **kwargs)


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_buckets=0), "num_buckets"),
        (dict(log_every_n_steps=0), "log_every_n_steps"),
        (dict(generate_every_n_epochs=0), "generate_every_n_epochs"),
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
    with pytest.raises(ValueError, match=rf"^{field}="):
        DiffusionMetricsLogger(**kwargs)


def test_arguments_checked_against_the_model_at_setup(tmp_path):
    module = tiny_ddpm(num_train_timesteps=100)
    too_many = DiffusionMetricsLogger(num_buckets=101)
    with pytest.raises(ValueError, match=r"num_buckets=101 .*num_train_timesteps=100"):
        too_many.setup(stub_trainer(tmp_path, too_many), module, "fit")
    bad_class = DiffusionMetricsLogger(classes=[0, 3])
    with pytest.raises(ValueError, match=r"classes=\[0, 3\]"):
        bad_class.setup(stub_trainer(tmp_path, bad_class), module, "fit")


def test_callback_is_built_from_yaml():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_string(
        "callback:\n  class_path: diffusion_lightning.callbacks.metrics.DiffusionMetricsLogger\n"
        "  init_args: {num_buckets: 5, classes: [1, 2], log_latent_space: false}\n"
    )
    callback = parser.instantiate(config).callback
    assert isinstance(callback, DiffusionMetricsLogger)
    assert (callback.num_buckets, callback.classes, callback.log_latent_space) == (5, [1, 2], False)


# ---------------------------------------------------------------------- loss per timestep bucket


def test_bucket_edges_cover_every_timestep_once():
    buckets = TimestepBucketLoss(3, 10)
    assert buckets.edges() == [(0, 3), (4, 6), (7, 9)]
    timesteps = torch.arange(10)
    buckets.add(timesteps.float(), timesteps)  # loss = t, so a bucket's mean is the mean of its timesteps
    means, total = buckets.collect(SimpleNamespace(reduce=lambda t, reduce_op: t))
    assert means == [1.5, 5.0, 8.0] and total == 4.5
    assert buckets.collect(SimpleNamespace(reduce=lambda t, reduce_op: t)) == ([None, None, None], None)


def test_bucket_names_are_zero_padded(tmp_path):
    callback = no_generation()
    callback.setup(stub_trainer(tmp_path, callback), tiny_ddpm(), "fit")
    names = callback.bucket_names()
    assert names[0] == "t000-099" and names[-1] == "t900-999" and len(names) == 10


def test_known_losses_give_the_bucket_means(tmp_path):
    module = tiny_ddpm(num_train_timesteps=100)
    callback = no_generation(num_buckets=4, log_every_n_steps=2)
    trainer = stub_trainer(tmp_path, callback)
    logger = trainer.loggers[0]
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    train_batches(
        callback, trainer, module, [batch([1, 3, 10], [0, 24, 25]), batch([20, 5, 7], [99, 50, 74]), batch([4], [0])]
    )
    # logged at step 2 only, over the samples of steps 1 and 2
    assert logger.scalars == [
        (
            2,
            {
                "diffusion/loss": pytest.approx(46 / 6),
                "diffusion/loss_t00-24": 2.0,
                "diffusion/loss_t25-49": 10.0,
                "diffusion/loss_t50-74": 6.0,
                "diffusion/loss_t75-99": 20.0,
            },
        )
    ]
    callback.on_validation_batch_end(trainer, module, batch([2, 4], [10, 90]), None, 0)
    callback.on_validation_epoch_end(trainer, module)
    assert logger.scalars[-1] == (
        3,
        {"diffusion/val_loss": 3.0, "diffusion/val_loss_t00-24": 2.0, "diffusion/val_loss_t75-99": 4.0},
    )
    callback.on_train_epoch_end(trainer, module)
    callback.on_train_end(trainer, module)  # the rest of the window: step 3, one bucket
    assert logger.scalars[-1] == (3, {"diffusion/loss": 4.0, "diffusion/loss_t00-24": 4.0})
    assert callback.history == [
        {
            "epoch": 0,
            "step": 3,
            "train_loss_per_bucket": [pytest.approx(8 / 3), 10.0, 6.0, 20.0],
            "val_loss_per_bucket": [2.0, None, None, 4.0],
        }
    ]


def test_state_survives_a_checkpoint(tmp_path):
    module = tiny_ddpm(num_train_timesteps=100)
    epoch0 = [batch([1, 2], [0, 99]), batch([3, 4], [30, 60])]
    epoch1 = [batch([5, 6], [10, 20]), batch([7, 8], [80, 90])]

    def fresh():
        callback = no_generation(num_buckets=4, log_every_n_steps=4)
        trainer = stub_trainer(tmp_path, callback)
        callback.setup(trainer, module, "fit")
        return callback, trainer

    reference, trainer = fresh()
    reference.on_train_start(trainer, module)
    train_batches(reference, trainer, module, epoch0)
    reference.on_train_epoch_end(trainer, module)
    trainer.current_epoch = 1
    train_batches(reference, trainer, module, epoch1, first_step=3)
    reference.on_train_epoch_end(trainer, module)

    # interrupted: epoch 0 saved before its end hook (as ModelCheckpoint at validation end), then mid-epoch 1
    first, trainer = fresh()
    first.on_train_start(trainer, module)
    train_batches(first, trainer, module, epoch0)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second, trainer = fresh()
    second.load_state_dict(saved)
    trainer.global_step, trainer.current_epoch = 2, 1
    second.on_train_start(trainer, module)
    second.on_train_epoch_start(trainer, module)
    train_batches(second, trainer, module, epoch1[:1], first_step=3)
    buffer = io.BytesIO()
    torch.save(second.state_dict(), buffer)
    buffer.seek(0)

    third, trainer = fresh()
    third.load_state_dict(torch.load(buffer, weights_only=True))
    trainer.global_step, trainer.current_epoch = 3, 1
    third.on_train_start(trainer, module)
    train_batches(third, trainer, module, epoch1[1:], first_step=4)
    third.on_train_epoch_end(trainer, module)

    assert third.history == reference.history and len(third.history) == 2
    # the step-4 log covers steps 1-4: two restored, as if never interrupted
    assert trainer.loggers[0].scalars[-1][1]["diffusion/loss"] == pytest.approx(4.5)

    other_buckets = no_generation(num_buckets=5)
    other_buckets.setup(stub_trainer(tmp_path, other_buckets), module, "fit")
    with pytest.warns(UserWarning, match="not restored"):
        other_buckets.load_state_dict(third.state_dict())
    assert other_buckets.history == []


# ---------------------------------------------------------------------- generation


def test_latent_recorder_keeps_evenly_spaced_steps_and_the_last():
    pipeline = SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.arange(10)))
    recorder = LatentRecorder(num_frames=4, rows=2)
    for step in range(10):
        returned = recorder(pipeline, step, 9 - step, {"latents": torch.full((3, 1, 2, 2), float(step))})
        assert set(returned) == {"latents"}
    assert [frame[0, 0, 0, 0].item() for frame in recorder.frames] == [0.0, 3.0, 6.0, 9.0]
    assert recorder.frames[0].shape == (2, 1, 2, 2) and recorder.final[0, 0, 0, 0].item() == 9.0
    none = LatentRecorder(num_frames=0, rows=2)
    none(pipeline, 0, 9, {"latents": torch.zeros(3, 1, 2, 2)})
    assert none.frames == [] and none.final is not None


@pytest.mark.parametrize("rank_zero", [True, False])
def test_generation_pass_restores_modes_and_rng_and_matches_the_pipeline(tmp_path, rank_zero):
    torch.manual_seed(0)
    module = tiny_ddpm(num_train_timesteps=100, num_inference_steps=2, sampler="ddim")
    callback = DiffusionMetricsLogger(num_samples=3, seed=7)
    trainer = stub_trainer(tmp_path, callback, is_global_zero=rank_zero, loggers=[])
    callback.setup(trainer, module, "fit")
    module.train()
    module.unet.conv_in.eval()
    modes = [m.training for m in module.modules()]
    rng = torch.get_rng_state()
    callback.on_validation_epoch_end(trainer, module)
    callback.teardown(trainer, module, "fit")
    assert [m.training for m in module.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    if not rank_zero:
        assert callback.history == [] and not (tmp_path / "generation").exists()
        return

    record = callback.history[0]
    assert record["num_inference_steps"] == 2 and record["guidance_scale"] == module.guidance_scale
    assert record["seconds_per_image"] > 0 and record["peak_memory_mb"] > 0
    final = {}
    pipeline = module.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        [0, 1, 2],
        num_inference_steps=2,
        guidance_scale=module.guidance_scale,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        callback_on_step_end=lambda pipe, i, t, tensors: final.update(tensors) or tensors,
    ).images
    latents = final["latents"]
    for key, value in [
        ("mean", latents.mean()),
        ("std", latents.std()),
        ("min", latents.min()),
        ("max", latents.max()),
    ]:
        assert record[f"latent_{key}"] == pytest.approx(value.item(), rel=1e-5)
    folder = tmp_path / "generation" / "epoch=0"
    saved = np.asarray(PIL.Image.open(folder / "class=1" / "sample=000.png"))
    assert np.abs(saved.astype(float) - images[1, 0].numpy() * 255).max() <= 1.0
    assert {p.name for p in folder.iterdir()} >= {"samples.png", "trajectory.png", "class=0", "class=2"}


@pytest.mark.parametrize("switch", ["log_diffusion_metrics", "log_latent_space", "log_generation_steps"])
def test_each_switch_turns_off_only_its_part(tmp_path, switch):
    module = tiny_ddpm(num_train_timesteps=100, num_inference_steps=2, sampler="ddim")
    callback = DiffusionMetricsLogger(num_buckets=2, log_every_n_steps=1, num_samples=2, **{switch: False})
    trainer = stub_trainer(tmp_path, callback)
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    train_batches(callback, trainer, module, [batch([1, 2], [10, 90])])
    callback.on_validation_batch_end(trainer, module, batch([1, 2], [10, 90]), None, 0)
    callback.on_validation_epoch_end(trainer, module)
    callback.teardown(trainer, module, "fit")
    keys = trainer.loggers[0].keys()
    parts = {
        "log_diffusion_metrics": {"diffusion/loss", "diffusion/loss_t00-49", "diffusion/val_loss_t50-99"},
        "log_latent_space": {"latent/mean", "latent/std", "latent/min", "latent/max", "latent/values"},
        "log_generation_steps": {"generation/trajectory"},
    }
    for name, part in parts.items():
        assert part.isdisjoint(keys) if name == switch else part <= keys, name
    assert {"generation/seconds_per_image", "generation/peak_memory_mb", "generation/samples"} <= keys


def test_media_written_on_exception_and_errors_only_warned(tmp_path, monkeypatch):
    module = tiny_ddpm(num_train_timesteps=100, num_inference_steps=2, sampler="ddim")
    callback = DiffusionMetricsLogger(num_samples=2)
    trainer = stub_trainer(tmp_path, callback, loggers=[])
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_end(trainer, module)
    callback.on_exception(trainer, module, RuntimeError("boom"))
    assert (tmp_path / "generation" / "epoch=0" / "trajectory.png").is_file()
    assert not any(t.name == "diffusion-metrics-writer" for t in threading.enumerate())

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(callback, "_write_media", fail)
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_end(trainer, module)
    with pytest.warns(UserWarning, match="disk full"):
        callback.on_exception(trainer, module, RuntimeError("boom"))
    trainer.current_epoch = 1
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_end(trainer, module)
    with pytest.raises(OSError, match="disk full"):
        callback.on_train_end(trainer, module)
    callback.teardown(trainer, module, "fit")
    assert not any(t.name == "diffusion-metrics-writer" for t in threading.enumerate())


# ---------------------------------------------------------------------- a real run


def test_fit_logs_buckets_generation_latents_trajectory_and_summary(tmp_path):
    torch.manual_seed(0)
    module = tiny_ddpm(num_inference_steps=2, sampler="ddim")
    callback = DiffusionMetricsLogger(log_every_n_steps=1, num_samples=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    data = torch.utils.data.DataLoader(RandomDigits(16), batch_size=8)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, logger=logger, callbacks=[callback, RunSummary()], limit_val_batches=1
    )
    trainer.fit(module, data, data)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])

    def value(tag):
        return events.Scalars(tag)[-1].value

    record = callback.history[0]
    assert {"diffusion/loss", "diffusion/val_loss"} <= scalars
    assert value("diffusion/val_loss") == pytest.approx(value("val/loss"))  # one batch, no loss weighting
    val_buckets = {
        f"diffusion/val_loss_{name}": mean
        for name, mean in zip(callback.bucket_names(), record["val_loss_per_bucket"])
        if mean is not None
    }
    assert len(val_buckets) >= 4 and set(val_buckets) == {t for t in scalars if t.startswith("diffusion/val_loss_")}
    for tag, mean in val_buckets.items():
        assert value(tag) == pytest.approx(mean)
    assert any(tag.startswith("diffusion/loss_t") for tag in scalars)
    assert value("generation/guidance_scale") == 2.0 and value("generation/num_inference_steps") == 2
    assert value("generation/seconds_per_image") == pytest.approx(record["seconds_per_image"])
    assert value("generation/peak_memory_mb") > 0
    for key in ("mean", "std", "min", "max"):
        assert value(f"latent/{key}") == pytest.approx(record[f"latent_{key}"])
    assert value("latent/min") < value("latent/mean") < value("latent/max")

    images = events.Tags()["images"]
    assert {"generation/samples", "generation/trajectory", "diffusion/summary"} <= set(images)
    strip = events.Images("generation/trajectory")[0]
    assert (strip.width, strip.height) == (2 * 10 + 2, 3 * 10 + 2)  # 2 steps x 3 samples of 8 px, 2 px padding
    # the strip's last column is the final sample, as in the grid of images
    strip_png = np.asarray(PIL.Image.open(tmp_path / "generation" / "epoch=0" / "trajectory.png"))
    grid_png = np.asarray(PIL.Image.open(tmp_path / "generation" / "epoch=0" / "samples.png"))
    for row in range(3):
        assert np.array_equal(
            strip_png[2 + 10 * row : 10 + 10 * row, 12:20], grid_png[2:10, 2 + 10 * row : 10 + 10 * row]
        )

    png = (tmp_path / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    PIL.Image.open(io.BytesIO(png)).verify()

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "finished"
    assert len(summary["diffusion"]["timestep_buckets"]) == 10
    (epoch,) = summary["diffusion"]["epochs"]
    assert set(epoch) >= {
        "epoch",
        "step",
        "train_loss_per_bucket",
        "val_loss_per_bucket",
        "seconds_per_image",
        "peak_memory_mb",
        "latent_mean",
        "latent_std",
        "latent_min",
        "latent_max",
    }


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
