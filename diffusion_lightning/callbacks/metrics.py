"""Diffusion-specific training metrics: loss per noise level, sampling cost and sample statistics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import PIL.Image
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from diffusion_lightning.callbacks.evaluation import PeriodicEvaluation
from diffusion_lightning.callbacks.run_info import LatentRecorder, TimestepBucketLoss, peak_memory_mb, summary_figure
from diffusion_lightning.callbacks.samples import (
    check_classes,
    sampling_defaults,
    sampling_mode,
    warn_if_after_weight_averaging,
)
from diffusion_lightning.loggers.media import log_histogram, log_image
from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.schedulers import SCHEDULERS
from diffusion_lightning.utils.async_writer import AsyncWriter
from diffusion_lightning.utils.images import make_grid, save_images, to_pil

__all__ = ["DiffusionMetricsLogger"]

_GENERATION_KEYS = ("seconds_per_image", "peak_memory_mb", "guidance_scale", "num_inference_steps")
_LATENT_KEYS = ("mean", "std", "min", "max")


def _check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        accepted = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}.")


class DiffusionMetricsLogger(Callback):
    """Log how a diffusion model learns across noise levels, and what and how fast it generates.

    Loss per noise level (``log_diffusion_metrics``): ``diffusion/loss``, the mean unweighted
    per-sample loss since the last log, and ``diffusion/loss_t<lo>-<hi>`` for each of
    ``num_buckets`` equal timestep ranges of ``[0, T)`` (inclusive, zero-padded bounds such as
    ``diffusion/loss_t000-099``), so loss against noise level reads as a curve; sums stay on the
    device and are read once per log. After each validation, ``diffusion/val_loss`` and
    ``diffusion/val_loss_t<lo>-<hi>`` from the module's repeatable validation.

    Generation, every ``generate_every_n_epochs`` epochs at the end of validation (with EMA, the
    averaged weights), on rank 0: ``build_pipeline()`` makes ``num_samples`` images of fixed
    classes from a fixed seed, leaving the global RNG untouched. Logged:
    ``generation/seconds_per_image``, ``generation/peak_memory_mb`` (CUDA ``max_memory_allocated``;
    on CPU the process's peak RSS, which never decreases), ``generation/guidance_scale``,
    ``generation/num_inference_steps``, the grid ``generation/samples``; with ``log_latent_space``
    ``latent/mean|std|min|max`` and the histogram ``latent/values`` of the final samples before
    clamping; with ``log_generation_steps`` the strip ``generation/trajectory`` (a row per sample,
    ``x_t`` after evenly spaced steps). PNGs go to ``<default_root_dir>/generation/epoch=<e>/``.
    Encoding and media writes run on an :class:`~diffusion_lightning.utils.async_writer.AsyncWriter`
    thread, drained when training ends.

    The per-epoch :attr:`history` travels in checkpoints; when fitting ends it is drawn as
    ``<default_root_dir>/summary.png`` (logged as ``diffusion/summary``) and ``RunSummary`` adds
    it to ``metrics.json``. The callback acts only while fitting.

    Args:
        num_buckets: Number of timestep buckets over ``[0, T)``, from 1 to ``T``.
        log_every_n_steps: Optimizer steps between training logs; default: the Trainer's.
        generate_every_n_epochs: Epochs between generation passes; ``None`` never generates.
        num_samples: Images per generation pass.
        classes: Classes of the images, repeated up to ``num_samples``; default every class.
        num_inference_steps: Sampling steps; default: the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale; default: the module's ``guidance_scale``.
        scheduler: Sampling scheduler (``ddpm``, ``ddim``, ``dpm``, ``euler``, ``euler_a``,
            ``unipc``); default: the module's ``sampler``.
        seed: Seed of the generation noise (a CPU generator: the same noise on any device).
        trajectory_num_samples: Rows of the trajectory strip (the first samples).
        trajectory_num_steps: Columns of the trajectory strip (evenly spaced steps, the last included).
        log_diffusion_metrics: Log the training and validation loss per timestep bucket.
        log_latent_space: Log statistics of the final samples before clamping.
        log_generation_steps: Log the denoising trajectory strip.
        save_images: Also write the generated images as PNG files.
        summary_figure: Draw and log ``summary.png`` when fitting ends.
        queue_size: Media jobs that may wait for the background writer before training blocks.
        evaluate_every_n_epochs: Epochs between evaluations (the ``evaluate`` command's scoring on
            a bounded budget, see :mod:`~diffusion_lightning.callbacks.evaluation`); ``None`` never
            evaluates. Logs ``evals/accuracy``, ``evals/fid``, ... for early stopping and checkpoints.
        evaluation: What an evaluation generates and measures: fields of
            :class:`~diffusion_lightning.metrics.EvaluationConfig`, where 100 samples, 10 sampling
            steps and no progress bars replace its defaults.
    """

    def __init__(
        self,
        num_buckets: int = 10,
        log_every_n_steps: int | None = None,
        generate_every_n_epochs: int | None = 1,
        num_samples: int = 8,
        classes: list[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int = 0,
        trajectory_num_samples: int = 4,
        trajectory_num_steps: int = 6,
        log_diffusion_metrics: bool = True,
        log_latent_space: bool = True,
        log_generation_steps: bool = True,
        save_images: bool = True,
        summary_figure: bool = True,
        queue_size: int = 8,
        evaluate_every_n_epochs: int | None = None,
        evaluation: dict[str, Any] | None = None,
    ) -> None:
        _check_int("num_buckets", num_buckets)
        _check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        _check_int("generate_every_n_epochs", generate_every_n_epochs, allow_none=True)
        _check_int("num_samples", num_samples)
        _check_int("num_inference_steps", num_inference_steps, allow_none=True)
        _check_int("trajectory_num_samples", trajectory_num_samples)
        _check_int("trajectory_num_steps", trajectory_num_steps)
        _check_int("queue_size", queue_size)
        if guidance_scale is not None and guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} is not accepted; expected a number >= 0 or None.")
        if classes is not None and (not classes or any(not isinstance(c, int) or c < 0 for c in classes)):
            raise ValueError(f"classes={classes!r} is not accepted; expected a non-empty list of ints >= 0 or None.")
        if scheduler is not None:
            check_choice("scheduler", scheduler, tuple(SCHEDULERS))
        self.num_buckets = num_buckets
        self.log_every_n_steps = log_every_n_steps
        self.generate_every_n_epochs = generate_every_n_epochs
        self.num_samples = num_samples
        self.classes = classes
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.seed = seed
        self.trajectory_num_samples = trajectory_num_samples
        self.trajectory_num_steps = trajectory_num_steps
        self.log_diffusion_metrics = log_diffusion_metrics
        self.log_latent_space = log_latent_space
        self.log_generation_steps = log_generation_steps
        self.save_images = save_images
        self.summary_figure = summary_figure
        self.queue_size = queue_size
        self.evaluation = (
            PeriodicEvaluation(evaluate_every_n_epochs, evaluation) if evaluate_every_n_epochs is not None else None
        )
        self.history: list[dict[str, Any]] = []
        """One record per epoch: bucket losses, generation cost and latent statistics."""
        self._window: TimestepBucketLoss | None = None  # since the last training log
        self._train: TimestepBucketLoss | None = None  # this training epoch
        self._val: TimestepBucketLoss | None = None  # this validation
        self._pending_state: dict[str, Any] | None = None
        self._writer: AsyncWriter | None = None
        self._last_log_step = 0
        self._generated_epoch: int | None = None
        self._classes: list[int] = []  # the classes to generate, resolved at setup
        self._warned_outputs = False

    # ------------------------------------------------------------------ set-up and state

    @property
    def bucket_edges(self) -> list[tuple[int, int]]:
        """Inclusive ``(lo, hi)`` timesteps of each bucket (known once fitting has set up)."""
        return self._train.edges() if self._train is not None else []

    def bucket_names(self) -> list[str]:
        """The metric suffix of each bucket, ``t<lo>-<hi>`` zero-padded to the widest timestep."""
        width = len(str(self._train.num_train_timesteps - 1)) if self._train is not None else 1
        return [f"t{lo:0{width}d}-{hi:0{width}d}" for lo, hi in self.bucket_edges]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        if not isinstance(pl_module, DiffusionModule):
            raise TypeError(f"DiffusionMetricsLogger needs a DiffusionModule, got {type(pl_module).__name__}.")
        noise_scheduler: Any = pl_module.noise_scheduler
        steps = int(noise_scheduler.config.num_train_timesteps)
        self._window, self._train, self._val = (TimestepBucketLoss(self.num_buckets, steps) for _ in range(3))
        if self.generate_every_n_epochs is not None:
            num_classes = getattr(pl_module, "num_classes", None)
            if num_classes is not None:
                self._classes = check_classes(self.classes, num_classes)
            elif self.classes is not None:
                self._classes = list(self.classes)
            else:
                raise ValueError(f"classes=None needs a module with num_classes; {type(pl_module).__name__} has none.")
            warn_if_after_weight_averaging(trainer, self)
        if self.evaluation is not None:
            self.evaluation.setup(trainer)
        self._close_writer(raise_errors=True)  # one left by an earlier fit that did not tear down
        self._writer = AsyncWriter(self.queue_size, name="diffusion-metrics-writer")
        self._generated_epoch = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"bucket_edges": self.bucket_edges, "history": [dict(r) for r in self.history]}
        if self._window is not None and self._train is not None:
            state.update(window=self._window.state_dict(), train=self._train.state_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [tuple(edge) for edge in state_dict.get("bucket_edges", [])]
        if saved != self.bucket_edges:
            rank_zero_warn(
                f"The checkpoint's DiffusionMetricsLogger had timestep buckets {saved}, this one {self.bucket_edges}; "
                "its history is not restored."
            )
            return
        self.history = [dict(record) for record in state_dict.get("history", [])]
        self._pending_state = state_dict

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_log_step = trainer.global_step
        state, self._pending_state = self._pending_state, None
        if state and "train" in state and self._window is not None and self._train is not None:
            self._window.load_state_dict(state["window"])
            self._train.load_state_dict(state["train"])
            if not trainer.is_global_zero:  # the saved sums are rank 0's: count them once
                self._window.totals.zero_()
                self._train.totals.zero_()

    # ------------------------------------------------------------------ loss per timestep bucket

    def _losses(self, outputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if isinstance(outputs, dict) and "per_sample_loss" in outputs and "timesteps" in outputs:
            return outputs["per_sample_loss"], outputs["timesteps"]
        if not self._warned_outputs:
            self._warned_outputs = True
            rank_zero_warn("The step returned no 'per_sample_loss' and 'timesteps'; loss buckets are not logged.")
        return None

    def _record(self, epoch: int, step: int) -> dict[str, Any]:
        record = next((r for r in self.history if r["epoch"] == epoch), None)
        if record is None:
            record = {"epoch": epoch, "step": step}
            self.history.append(record)
            self.history.sort(key=lambda r: r["epoch"])
        record["step"] = max(record["step"], step)
        return record

    def _log_scalars(self, trainer: pl.Trainer, metrics: dict[str, float | None]) -> None:
        values = {name: float(value) for name, value in metrics.items() if value is not None}
        if values and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def _log_buckets(self, trainer: pl.Trainer, prefix: str, means: list[float | None], total: float | None) -> None:
        metrics = {f"{prefix}_{name}": mean for name, mean in zip(self.bucket_names(), means)}
        self._log_scalars(trainer, {prefix: total, **metrics})

    def _log_window(self, trainer: pl.Trainer) -> None:
        assert self._window is not None
        self._last_log_step = trainer.global_step
        self._log_buckets(trainer, "diffusion/loss", *self._window.collect(trainer.strategy))

    def _finish_train_epoch(self, trainer: pl.Trainer, epoch: int) -> None:
        assert self._train is not None
        means, _ = self._train.collect(trainer.strategy)
        if any(mean is not None for mean in means):
            self._record(epoch, trainer.global_step)["train_loss_per_bucket"] = means

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint written at validation end holds the sums of an epoch whose end hook had not run yet.
        if self._train is not None and self._train.epoch not in (None, trainer.current_epoch):
            self._finish_train_epoch(trainer, self._train.epoch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_diffusion_metrics or self._window is None or self._train is None:
            return
        losses = self._losses(outputs)
        if losses is None:
            return
        self._window.add(*losses)
        self._train.add(*losses)
        self._train.epoch = trainer.current_epoch
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step != self._last_log_step and trainer.global_step % every == 0:
            self._log_window(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_diffusion_metrics and self._train is not None:
            self._finish_train_epoch(trainer, trainer.current_epoch)
            self._train.epoch = None

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not self.log_diffusion_metrics or self._val is None:
            return
        losses = self._losses(outputs)
        if losses is not None:
            self._val.add(*losses)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._val is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.log_diffusion_metrics:
            means, total = self._val.collect(trainer.strategy)
            if total is not None:
                self._log_buckets(trainer, "diffusion/val_loss", means, total)
                self._record(trainer.current_epoch, trainer.global_step)["val_loss_per_bucket"] = means
        every = self.generate_every_n_epochs
        epoch = trainer.current_epoch
        if every is not None and (epoch + 1) % every == 0 and self._generated_epoch != epoch:
            self._generated_epoch = epoch
            if trainer.is_global_zero:
                self._generation_pass(trainer, pl_module)
        if self.evaluation is not None and self.evaluation.due(trainer):
            values = self.evaluation.run(trainer, pl_module)
            self._record(epoch, trainer.global_step)["evals"] = values

    # ------------------------------------------------------------------ generation

    def sample(self, pipeline: Any, class_labels: list[int], generator: torch.Generator, **kwargs: Any) -> torch.Tensor:
        """Run the pipeline; return ``(B, C, H, W)`` images in ``[0, 1]``.

        ``kwargs``: ``num_inference_steps``, ``guidance_scale``, ``callback_on_step_end`` and
        ``callback_on_step_end_tensor_inputs``. Override for pipelines called another way, passing
        the callback on, so that latent statistics and the trajectory are still recorded.
        """
        out = pipeline(class_labels, generator=generator, output_type="pt", **kwargs)
        return out.images

    def _generation_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, DiffusionModule) and self._writer is not None
        steps, scale = sampling_defaults(pl_module, self.num_inference_steps, self.guidance_scale)
        classes = self._classes
        labels = [classes[i % len(classes)] for i in range(self.num_samples)]
        frames = self.trajectory_num_steps if self.log_generation_steps else 0
        recorder = LatentRecorder(frames, self.trajectory_num_samples)
        device = pl_module.device
        cuda = device.type == "cuda"
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
        with sampling_mode(pl_module), torch.random.fork_rng(devices=rng_devices):
            pipeline = pl_module.build_pipeline(self.scheduler)
            pipeline.set_progress_bar_config(disable=True)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            images = self.sample(
                pipeline,
                labels,
                torch.Generator().manual_seed(self.seed),
                num_inference_steps=steps,
                guidance_scale=scale,
                callback_on_step_end=recorder,
                callback_on_step_end_tensor_inputs=["latents"],
            )
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start

        generation = dict(zip(_GENERATION_KEYS, (seconds / len(labels), peak_memory_mb(device), scale, steps)))
        metrics: dict[str, float | None] = {f"generation/{k}": v for k, v in generation.items()}
        final = recorder.final.detach().float().cpu() if recorder.final is not None else None
        if self.log_latent_space and final is not None:
            stats = [final.mean(), final.std(), final.min(), final.max()]
            latent = dict(zip(_LATENT_KEYS, torch.stack(stats).tolist()))
            generation.update({f"latent_{k}": v for k, v in latent.items()})
            metrics.update({f"latent/{k}": v for k, v in latent.items()})
        self._record(trainer.current_epoch, trainer.global_step).update(generation)
        self._log_scalars(trainer, metrics)
        media = {
            "images": images.detach().float().cpu(),
            "labels": torch.tensor(labels),
            "nrow": min(len(classes), len(labels)),
            "frames": torch.stack(recorder.frames, dim=1) if recorder.frames else None,
            "final": final if self.log_latent_space else None,
        }
        self._writer.submit(self._write_media, trainer, trainer.current_epoch, trainer.global_step, media)

    def _write_media(self, trainer: pl.Trainer, epoch: int, step: int, media: dict[str, Any]) -> None:
        """On the writer thread: the grid, the trajectory strip, their PNGs and the latent histogram."""
        folder = Path(trainer.default_root_dir) / "generation" / f"epoch={epoch}"
        grid = make_grid(media["images"], nrow=media["nrow"])
        log_image(trainer, "generation/samples", grid, step=step)
        if self.save_images:
            save_images(media["images"], media["labels"], folder, prefix="class")
            to_pil(grid).save(folder / "samples.png")
        frames = media["frames"]  # (rows, steps, C, H, W) latents
        if frames is not None:
            strip = (frames.flatten(0, 1) / 2 + 0.5).clamp(0, 1)
            strip = make_grid(strip if strip.shape[1] in (1, 3) else strip[:, :1], nrow=frames.shape[1])
            log_image(trainer, "generation/trajectory", strip, step=step)
            if self.save_images:
                to_pil(strip).save(folder / "trajectory.png")
        if media["final"] is not None:
            log_histogram(trainer, "latent/values", media["final"], step=step)

    # ------------------------------------------------------------------ end of training

    def summary(self) -> dict[str, Any]:
        """The bucket bounds and the per-epoch history, for ``metrics.json``."""
        return {"timestep_buckets": [list(edge) for edge in self.bucket_edges], "epochs": list(self.history)}

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
        if self.log_diffusion_metrics and self._window is not None and trainer.global_step != self._last_log_step:
            self._log_window(trainer)
        if self._writer is not None:
            self._writer.drain()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.summary_figure and trainer.is_global_zero and self.history):
            return
        figure = summary_figure(self.history, self.bucket_edges)
        path = Path(trainer.default_root_dir) / "summary.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        with PIL.Image.open(path) as image:
            log_image(trainer, "diffusion/summary", image.convert("RGB"))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_writer(raise_errors=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_writer(raise_errors=False)
