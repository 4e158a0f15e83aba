"""GenerationMonitor: generation cost, latent statistics, trajectory and media, for class and text models."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.callbacks import GenerationMonitor
from diffusion_lightning.callbacks.run_info import LatentRecorder, peak_memory_mb
from tests.conftest import REPO, Crash, RandomDigits, quiet_trainer, tiny_ddpm
from tests.test_latent import loader as captioned

WRITER = "generation-monitor-writer"
PROMPTS = ["a digit one", "a digit two"]


def model(kind: str):
    """A tiny model of ``kind`` and its training and validation loaders."""
    torch.manual_seed(0)
    if kind == "ddpm":
        digits = torch.utils.data.DataLoader(RandomDigits(8), batch_size=8)
        return tiny_ddpm(num_train_timesteps=100, num_inference_steps=2, sampler="ddim"), digits, digits
    module = LatentDiffusionModule(validation_prompts=PROMPTS, num_inference_steps=2, sampler="ddim")
    return module, captioned(), captioned()


def fit(tmp_path, kind: str, callbacks: list, epochs: int = 1, logger=False):
    module, train, val = model(kind)
    trainer = quiet_trainer(
        tmp_path, max_epochs=epochs, limit_train_batches=1, limit_val_batches=1, logger=logger, callbacks=callbacks
    )
    trainer.fit(module, train, val)
    return module, trainer


def events(logger: TensorBoardLogger) -> EventAccumulator:
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def direct_call(module, conditions: list, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's pipeline called directly: images and the final latents."""
    final = {}
    pipeline = module.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(
        num_inference_steps=2,
        guidance_scale=module.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        callback_on_step_end=lambda pipe, i, t, tensors: final.update(tensors) or tensors,
    )
    with torch.no_grad():
        if isinstance(module, LatentDiffusionModule):
            images = pipeline(prompt=conditions, height=16, width=16, **kwargs).images
        else:
            images = pipeline(conditions, **kwargs).images
    return images, final["latents"]


def png(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path)).astype(float)


def as_png(image: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` image in [0, 1] as the array of its PNG file."""
    array = image.permute(1, 2, 0).numpy() * 255
    return array[..., 0] if array.shape[-1] == 1 else array


# ---------------------------------------------------------------------- the recorder


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


# ---------------------------------------------------------------------- the pass


class Around(Callback):
    """Listed before and after the monitor: a mixed train/eval state and the RNG going in, and coming out."""

    def __init__(self, before: "Around | None" = None) -> None:
        self.before = before
        self.modes: list[bool] = []
        self.rng: torch.Tensor | None = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.before is None:
            pl_module.train()
            pl_module.denoiser.conv_in.eval()
            torch.rand(1)  # some state of its own
        self.modes = [m.training for m in pl_module.modules()]
        self.rng = torch.get_rng_state()


def _proc_status_mb(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


PEAK_MEMORY_SCRIPT = """
import json, torch
from pathlib import Path
from diffusion_lightning.callbacks.run_info import peak_memory_mb

def _proc_status_mb(field):
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field + ":"))
    return int(line.split()[1]) / 1024

cpu = torch.device("cpu")
before, resident_before = peak_memory_mb(cpu), _proc_status_mb("VmRSS")
# MiB: 256 above the peak so far (getrusage's, which can include the parent's size at fork, or the kernel's)
size = int(max(before, _proc_status_mb("VmHWM")) - resident_before) + 256
block = torch.ones(size * 2**20 // 4)  # written, so resident
during = peak_memory_mb(cpu)
del block
after, high_water, resident = peak_memory_mb(cpu), _proc_status_mb("VmHWM"), _proc_status_mb("VmRSS")
print("PEAKS", json.dumps([before, resident_before, size, during, after, high_water, resident]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, Linux's record of the peak RSS")
def test_peak_memory_on_the_cpu_is_the_process_peak_in_mib():
    """In a fresh process: allocating 256 MiB above the peak raises it by that much; freeing it does not lower it."""
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})  # fmt: skip
    line = next((row for row in proc.stdout.splitlines() if row.startswith("PEAKS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, resident_before, size, during, after, high_water, resident = json.loads(line[len("PEAKS ") :])
    assert 0 <= during - (resident_before + size) <= 40, (before, resident_before, size, during)  # MiB, not KiB
    assert during - before > 200  # the peak rose
    assert after == during and resident < during - 200  # a peak: freed memory does not lower it
    assert abs(after - high_water) < 2  # what the kernel reports as the process's peak (VmHWM)


@pytest.mark.parametrize("kind, rank", [("ddpm", 0), ("ddpm", 1), ("latent", 0)])
def test_generation_pass_restores_modes_and_rng_and_matches_the_pipeline(tmp_path, monkeypatch, kind, rank):
    if rank:
        monkeypatch.setattr(Trainer, "is_global_zero", property(lambda self: False))
    monitor = GenerationMonitor(num_samples=3, seed=7)
    before = Around()
    after = Around(before)
    rss_before_mb = _proc_status_mb("VmRSS") if sys.platform == "linux" else None
    module, _ = fit(tmp_path, kind, [before, monitor, after])
    assert after.modes == before.modes and True in before.modes and False in before.modes
    assert torch.equal(after.rng, before.rng)
    if rank:  # only rank 0 generates
        assert monitor.history == [] and not (tmp_path / "generation").exists()
        return

    conditions = [0, 1, 2] if kind == "ddpm" else [*PROMPTS, PROMPTS[0]]  # every class, the prompts cycled
    images, latents = direct_call(module, conditions, seed=7)
    (record,) = monitor.history
    assert (record["epoch"], record["step"]) == (0, 1)
    assert record["num_inference_steps"] == 2 and record["guidance_scale"] == module.guidance_scale == 2.0
    assert record["seconds_per_image"] > 0
    if sys.platform == "linux":  # the process's peak RSS: at least what it held before, at most its peak now
        assert rss_before_mb <= record["peak_memory_mb"] <= peak_memory_mb(torch.device("cpu"))
    # the final latents: the samples before clamping (pixels), the 4-channel VAE latents before decoding (text)
    assert latents.shape == ((3, 1, 8, 8) if kind == "ddpm" else (3, 4, 8, 8))
    for key, value in [
        ("mean", latents.mean()),
        ("std", latents.std()),
        ("min", latents.min()),
        ("max", latents.max()),
    ]:
        assert record[f"latent_{key}"] == pytest.approx(value.item(), rel=1e-5, abs=1e-6)

    folder = tmp_path / "generation" / "epoch=0"
    if kind == "ddpm":
        files = {"class=0/sample=000.png": 0, "class=1/sample=000.png": 1, "class=2/sample=000.png": 2}
    else:
        files = {"prompt=0/sample=000.png": 0, "prompt=1/sample=000.png": 1, "prompt=0/sample=001.png": 2}
        assert (folder / "prompts.txt").read_text() == "0\ta digit one\n1\ta digit two\n"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("sample=*.png")) == sorted(files)
    for name, index in files.items():
        assert np.abs(png(folder / name) - as_png(images[index])).max() <= 1.0, name
    assert (folder / "samples.png").is_file() and (folder / "trajectory.png").is_file()


@pytest.mark.parametrize("kind", ["ddpm", "latent"])
def test_fit_logs_the_scalars_and_images(tmp_path, kind):
    monitor = GenerationMonitor(num_samples=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, kind, [monitor], logger=logger)
    run = events(logger)

    def value(tag):
        (event,) = run.Scalars(tag)
        return event.value

    (record,) = monitor.history
    assert value("generation/guidance_scale") == 2.0 and value("generation/num_inference_steps") == 2
    assert value("generation/seconds_per_image") == pytest.approx(record["seconds_per_image"])
    assert (
        value("generation/peak_memory_mb") == pytest.approx(record["peak_memory_mb"]) and record["peak_memory_mb"] > 0
    )
    for key in ("mean", "std", "min", "max"):
        assert value(f"latent/{key}") == pytest.approx(record[f"latent_{key}"])
    assert value("latent/min") < value("latent/mean") < value("latent/max")
    assert {"generation/samples", "generation/trajectory"} <= set(run.Tags()["images"])
    (histogram,) = run.Histograms("latent/values")
    assert histogram.histogram_value.num == (3 * 8 * 8 if kind == "ddpm" else 3 * 4 * 8 * 8)

    # the strip: a row per sample, a column per kept step (2 steps), 8-pixel latents with 2-pixel padding
    (strip,) = run.Images("generation/trajectory")
    assert (strip.width, strip.height) == (2 * 10 + 2, 3 * 10 + 2)
    (grid,) = run.Images("generation/samples")
    image = 8 if kind == "ddpm" else 16
    columns = 3 if kind == "ddpm" else 2  # one per distinct class or prompt
    assert (grid.width, grid.height) == (columns * (image + 2) + 2, -(-3 // columns) * (image + 2) + 2)
    folder = tmp_path / "generation" / "epoch=0"
    strip_png, grid_png = png(folder / "trajectory.png"), png(folder / "samples.png")
    if kind == "ddpm":  # pixels: the strip's last column is the final sample, as in the grid
        for row in range(3):
            assert np.array_equal(
                strip_png[2 + 10 * row : 10 + 10 * row, 12:20], grid_png[2:10, 2 + 10 * row : 10 + 10 * row]
            )
    else:  # 4-channel latents: the first channel, in grey
        assert strip_png.ndim == 2 or np.array_equal(strip_png[..., 0], strip_png[..., 1])


@pytest.mark.parametrize("switch", ["log_latent_space", "log_generation_steps", "save_images"])
def test_each_switch_turns_off_only_its_part(tmp_path, switch):
    monitor = GenerationMonitor(num_samples=2, **{switch: False})
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, "ddpm", [monitor], logger=logger)
    tags = events(logger).Tags()
    folder = tmp_path / "generation" / "epoch=0"
    seen = {f"scalar:{t}" for t in tags["scalars"]} | {f"image:{t}" for t in tags["images"]}
    seen |= {f"histogram:{t}" for t in tags["histograms"]} | {f"record:{k}" for k in monitor.history[0]}
    seen |= {f"file:{p.relative_to(folder)}" for p in folder.rglob("*")} if folder.exists() else set()
    latent = ("mean", "std", "min", "max")
    parts = {
        "log_latent_space": {f"scalar:latent/{k}" for k in latent} | {f"record:latent_{k}" for k in latent},
        "log_generation_steps": {"image:generation/trajectory"},
        "save_images": {"file:samples.png", "file:class=0/sample=000.png", "file:class=1/sample=000.png"},
    }
    parts["log_latent_space"].add("histogram:latent/values")
    if switch != "save_images":  # the strip's file is a file and a part of the trajectory: both switches drop it
        parts["log_generation_steps"].add("file:trajectory.png")
    if switch != "log_generation_steps":
        parts["save_images"].add("file:trajectory.png")
    for name, part in parts.items():
        assert part.isdisjoint(seen) if name == switch else part <= seen, name
    always = {"generation/seconds_per_image", "generation/peak_memory_mb", "generation/guidance_scale"}
    assert {f"scalar:{t}" for t in always} | {"image:generation/samples"} <= seen


def test_every_n_epochs_and_the_history_in_checkpoints(tmp_path):
    monitor = GenerationMonitor(every_n_epochs=2, num_samples=1)
    fit(tmp_path, "ddpm", [monitor], epochs=3)
    assert [(r["epoch"], r["step"]) for r in monitor.history] == [(1, 2)]
    assert [p.name for p in (tmp_path / "generation").iterdir()] == ["epoch=1"]
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)
    restored = GenerationMonitor()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.history == monitor.history and restored.epoch_records() == monitor.history


# ---------------------------------------------------------------------- the background writer


class CrashAfterValidation(Callback):
    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            raise Crash("killed after the generation pass")


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WRITER]


def test_media_written_on_exception_and_errors_only_warned(tmp_path, monkeypatch):
    monitor = GenerationMonitor(num_samples=2)
    with pytest.raises(Crash):
        fit(tmp_path / "crash", "ddpm", [monitor, CrashAfterValidation()])
    assert (tmp_path / "crash" / "generation" / "epoch=0" / "trajectory.png").is_file()  # drained before the end
    assert writer_threads() == []

    def fail(*args):
        raise OSError("disk full")

    failing = GenerationMonitor(num_samples=2)
    monkeypatch.setattr(failing, "_write_media", fail)
    warning = pytest.warns(UserWarning, match="Writing generated images failed: OSError\\('disk full'\\)")
    with warning, pytest.raises(Crash):  # the run's own error, not the writer's
        fit(tmp_path / "both", "ddpm", [failing, CrashAfterValidation()])
    failing = GenerationMonitor(num_samples=2)
    monkeypatch.setattr(failing, "_write_media", fail)
    with pytest.raises(OSError, match="disk full"):  # a run that otherwise finished reports it
        fit(tmp_path / "fails", "ddpm", [failing])
    assert writer_threads() == []


def test_media_are_on_disk_when_training_ends(tmp_path, monkeypatch):
    monitor = GenerationMonitor(num_samples=1)
    write = monitor._write_media

    def slow_write(*args):
        time.sleep(0.3)
        write(*args)

    monkeypatch.setattr(monitor, "_write_media", slow_write)
    seen = {}

    class AtFitEnd(Callback):  # where RunSummary and the user's own code look for them
        def on_fit_end(self, trainer, pl_module):
            seen["files"] = sorted(p.name for p in (tmp_path / "generation" / "epoch=0").glob("*.png"))

    fit(tmp_path, "ddpm", [monitor, AtFitEnd()])
    assert seen["files"] == ["samples.png", "trajectory.png"]


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(trajectory_num_samples=0), "trajectory_num_samples"),
        (dict(trajectory_num_steps=True), "trajectory_num_steps"),
        (dict(queue_size=0), "queue_size"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(classes=[]), "classes"),
        (dict(scheduler="nope"), "scheduler"),
        (dict(classes=[1], prompts=["a digit"]), "classes"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        GenerationMonitor(**kwargs)


@pytest.mark.parametrize(
    "kind, kwargs, message",
    [
        ("ddpm", dict(classes=[0, 3]), r"classes=\[0, 3\]"),
        ("ddpm", dict(prompts=["a digit"]), "prompts"),
        ("boring", {}, "GenerationMonitor needs a DiffusionModule"),
    ],
)
def test_arguments_are_checked_against_the_model_before_training(tmp_path, kind, kwargs, message):
    module, train, _ = (BoringModel(), None, None) if kind == "boring" else model(kind)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[GenerationMonitor(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, train)
    assert trainer.global_step == 0
