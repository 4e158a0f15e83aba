"""Watch what generation costs and produces during training: time, memory, latent statistics, trajectory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from diffusion_lightning.callbacks.run_info import LatentRecorder, peak_memory_mb
from diffusion_lightning.callbacks.sampling import SamplingCallback
from diffusion_lightning.loggers.media import log_histogram, log_image
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.utils.async_writer import AsyncWriter
from diffusion_lightning.utils.images import make_grid, save_images, to_pil
from diffusion_lightning.utils.io import atomic_write_text

__all__ = ["GenerationMonitor"]

_LATENT_KEYS = ("mean", "std", "min", "max")


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is not accepted; expected an int >= 1.")


class GenerationMonitor(SamplingCallback):
    """Generate a few fixed samples every few epochs and log what it cost and what came out.

    On rank 0, at the end of every ``every_n_epochs``-th validation epoch of ``fit`` (with this
    package's ``EMA``, the averaged weights): ``num_samples`` images of the fixed classes or prompts
    (cycled) from a CPU generator seeded by ``seed``. Logged with ``LightningModule.log``
    (``rank_zero_only``): ``generation/seconds_per_image``, ``generation/peak_memory_mb`` (CUDA
    ``max_memory_allocated``; on CPU the process's peak RSS, which never decreases),
    ``generation/guidance_scale``, ``generation/num_inference_steps``; with ``log_latent_space``
    ``latent/mean|std|min|max`` of the final latents (the samples before clamping for a pixel
    model, the VAE latents before decoding for a latent one) and their histogram ``latent/values``.
    Images: the grid ``generation/samples`` and, with ``log_generation_steps``, the strip
    ``generation/trajectory`` (a row per sample, the latents after evenly spaced steps; the first
    channel when there are neither 1 nor 3). PNGs go to ``<default_root_dir>/generation/epoch=<e>/``
    (with ``prompts.txt`` for a text model). Encoding and writing run on a background
    :class:`~diffusion_lightning.utils.async_writer.AsyncWriter` thread, drained when training ends.

    The per-pass figures (:attr:`history`: seconds per image, peak memory, latent statistics) travel in checkpoints;
    :class:`~diffusion_lightning.callbacks.RunSummary` draws them in ``summary.png``.

    Args:
        every_n_epochs: Epochs between generation passes.
        num_samples: Images per pass.
        classes: Classes of a class-conditioned model, cycled up to ``num_samples``; default all.
        prompts: Prompts of a text-to-image model, cycled; default the module's ``validation_prompts``.
        negative_prompts: One negative prompt per prompt, or one for all.
        num_inference_steps: Sampling steps; default the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale; default the module's ``guidance_scale``.
        scheduler: Sampling scheduler; default the module's ``sampler``.
        seed: Seed of the generation noise.
        trajectory_num_samples: Rows of the trajectory strip (the first samples).
        trajectory_num_steps: Columns of the trajectory strip (evenly spaced steps, the last included).
        log_latent_space: Log statistics and a histogram of the final latents.
        log_generation_steps: Log the denoising trajectory strip.
        save_images: Also write the images as PNG files.
        queue_size: Media jobs that may wait for the background writer before training blocks.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 8,
        classes: list[int] | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int = 0,
        trajectory_num_samples: int = 4,
        trajectory_num_steps: int = 6,
        log_latent_space: bool = True,
        log_generation_steps: bool = True,
        save_images: bool = True,
        queue_size: int = 8,
    ) -> None:
        super().__init__(
            every_n_epochs, classes, prompts, negative_prompts, seed, num_inference_steps, guidance_scale, scheduler
        )
        for name, value in (
            ("num_samples", num_samples),
            ("trajectory_num_samples", trajectory_num_samples),
            ("trajectory_num_steps", trajectory_num_steps),
            ("queue_size", queue_size),
        ):
            _check_count(name, value)
        self.num_samples = num_samples
        self.trajectory_num_samples = trajectory_num_samples
        self.trajectory_num_steps = trajectory_num_steps
        self.log_latent_space = log_latent_space
        self.log_generation_steps = log_generation_steps
        self.save_images = save_images
        self.queue_size = queue_size
        self._writer: AsyncWriter | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._close_writer(raise_errors=True)  # one left by an earlier fit that did not tear down
        self._writer = AsyncWriter(self.queue_size, name="generation-monitor-writer")

    # ------------------------------------------------------------------ the pass

    @override
    def on_sample(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        conditions = self.conditions(pl_module).cycle(self.num_samples)
        steps, guidance = self.sampling_args(pl_module)
        frames = self.trajectory_num_steps if self.log_generation_steps else 0
        recorder = LatentRecorder(frames, self.trajectory_num_samples)
        device = pl_module.device
        pipeline = self.pipeline(pl_module)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        images = self.sample(
            pl_module, conditions, pipeline=pipeline, callback_on_step_end=recorder,
            callback_on_step_end_tensor_inputs=["latents"],
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        record: dict[str, Any] = {
            "seconds_per_image": seconds / len(conditions),
            "peak_memory_mb": peak_memory_mb(device),
            "guidance_scale": guidance,
            "num_inference_steps": steps,
        }
        scalars = {f"generation/{k}": v for k, v in record.items() if v is not None}
        final = recorder.final.detach().float().cpu() if recorder.final is not None else None
        if self.log_latent_space and final is not None:
            stats = torch.stack([final.mean(), final.std(), final.min(), final.max()]).tolist()
            record.update({f"latent_{k}": v for k, v in zip(_LATENT_KEYS, stats)})
            scalars.update({f"latent/{k}": v for k, v in zip(_LATENT_KEYS, stats)})
        self.record(trainer, **record)
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, rank_zero_only=True)
        media = {
            "images": images,
            # files per class id, or per prompt number (prompts.txt names them)
            "labels": torch.tensor(conditions.values) if conditions.kind == "class" else conditions.groups(),
            "prompts": list(conditions.values) if conditions.kind == "prompt" else None,
            "nrow": min(len(conditions.distinct()), len(conditions)),
            "frames": torch.stack(recorder.frames, dim=1) if recorder.frames else None,
            "final": final if self.log_latent_space else None,
        }
        assert self._writer is not None
        self._writer.submit(self._write_media, trainer, trainer.current_epoch, trainer.global_step, media)

    def _write_media(self, trainer: pl.Trainer, epoch: int, step: int, media: dict[str, Any]) -> None:
        """On the writer thread: the grid, the trajectory strip, their PNGs and the latent histogram."""
        folder = Path(trainer.default_root_dir) / "generation" / f"epoch={epoch}"
        grid = make_grid(media["images"], nrow=media["nrow"])
        log_image(trainer, "generation/samples", grid, step=step)
        if self.save_images:
            prefix = "prompt" if media["prompts"] is not None else "class"
            save_images(media["images"], media["labels"], folder, prefix=prefix)
            to_pil(grid).save(folder / "samples.png")
            if media["prompts"] is not None:
                distinct = list(dict.fromkeys(media["prompts"]))
                atomic_write_text(folder / "prompts.txt", "".join(f"{i}\t{p}\n" for i, p in enumerate(distinct)))
        frames = media["frames"]  # (rows, steps, C, H, W) latents
        if frames is not None:
            strip = (frames.flatten(0, 1) / 2 + 0.5).clamp(0, 1)
            strip = make_grid(strip if strip.shape[1] in (1, 3) else strip[:, :1], nrow=frames.shape[1])
            log_image(trainer, "generation/trajectory", strip, step=step)
            if self.save_images:
                to_pil(strip).save(folder / "trajectory.png")
        if media["final"] is not None:
            log_histogram(trainer, "latent/values", media["final"], step=step)

    # ------------------------------------------------------------------ the writer's life

    def _close_writer(self, raise_errors: bool) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as error:
            if raise_errors:
                raise
            rank_zero_warn(f"Writing generated images failed: {error!r}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is not None:
            self._writer.drain()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_writer(raise_errors=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_writer(raise_errors=False)
