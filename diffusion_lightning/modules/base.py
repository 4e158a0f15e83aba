"""The training core shared by every diffusion LightningModule.

:class:`DiffusionModule` owns the forward (noising) process, the objective and the optimizer
set-up. A concrete model says only how to turn a batch into ``(x_0, condition)``, how to drop the
condition for classifier-free guidance, how to run its network and how to assemble a pipeline.
Sampling lives in pipelines and logging beyond the losses lives in callbacks.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import AdamW
from typing_extensions import override

from diffusion_lightning.losses import (
    FLOW,
    LOSS_TYPES,
    WEIGHTING_SCHEMES,
    LossType,
    PredictionType,
    WeightingScheme,
    check_choice,
    diffusion_loss,
    flow_loss_weights,
    flow_noise,
    flow_sigmas,
    min_snr_weights,
    snr,
    training_target,
)
from diffusion_lightning.modules.nonfinite import NonFiniteLossGuard, NonFiniteLossMode
from diffusion_lightning.optim import WarmupCosineLR, optimizer_config
from diffusion_lightning.pipelines import save_pipeline_code
from diffusion_lightning.pipelines.conditioning import Conditions, ConditionSpec, generate
from diffusion_lightning.pipelines.sampling_defaults import write_sampling_defaults
from diffusion_lightning.schedulers import SCHEDULERS, make_scheduler, training_scheduler
from diffusion_lightning.utils.io import atomic_directory
from diffusion_lightning.utils.model_card import ModelCardOptions, write_model_card
from diffusion_lightning.utils.seeding import collect_rng_states, mix_seed, restore_rng_states

__all__ = ["BetaSchedule", "DiffusionModule", "DiffusionStepOutput", "SamplerName", "mix_seed"]

#: Noise schedules of the forward process (``schedulers.BETA_SCHEDULES``).
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
#: Sampling schedulers by their short names (``schedulers.SCHEDULERS``).
SamplerName = Literal["ddpm", "ddim", "dpm", "euler", "euler_a", "heun", "unipc"]


@dataclass
class DiffusionStepOutput:
    """Everything one denoising-loss evaluation computed, for callbacks and research code."""

    loss: torch.Tensor
    """Weighted mean loss (what is optimized)."""
    per_sample_loss: torch.Tensor
    """Unweighted loss of each sample, ``(B,)``."""
    timesteps: torch.Tensor
    """Timestep of each sample, ``(B,)``."""
    noisy: torch.Tensor
    """The network input ``x_t``."""
    prediction: torch.Tensor
    """The network output."""
    target: torch.Tensor
    """The regression target."""


class DiffusionModule(NonFiniteLossGuard, LightningModule, ABC):
    """Base LightningModule: noise, predict, regress, for any denoiser and conditioning.

    Noise, timesteps and condition dropout are drawn from a generator seeded by
    ``(seed, epoch, batch, rank)``, so an interrupted run resumed from a checkpoint draws exactly
    what the uninterrupted run would have, on any device and any number of processes. The global
    RNG states (torch, CUDA, numpy, random) are stored in checkpoints and restored on resume.
    Under data-parallel training each process draws its own noise (the rank is a key), and the
    logged ``train/loss``, ``val/loss`` and ``test/loss`` are means over all processes.

    A NaN or infinite training loss stops the run with
    :class:`~diffusion_lightning.modules.nonfinite.NonFiniteLossError` naming the step and the loss,
    or with ``nonfinite_loss: skip`` skips the optimizer step; a non-finite validation loss while
    fitting always stops it, before any checkpoint of that model is saved or ranked (see
    :class:`~diffusion_lightning.modules.nonfinite.NonFiniteLossGuard`).

    Args:
        num_train_timesteps: Length ``T`` of the forward process.
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2`` (cosine).
        beta_start: First beta of the linear schedules.
        beta_end: Last beta of the linear schedules.
        rescale_betas_zero_snr: Rescale the betas to reach zero terminal SNR (Lin et al. 2024).
        prediction_type: Network target: ``epsilon``, ``v_prediction`` or ``sample`` on the DDPM
            schedule above, or ``flow_prediction``: flow matching (rectified flow, as SD3 and Flux),
            ``x_t = (1 - sigma) x_0 + sigma * noise`` and the target ``noise - x_0``; the beta
            arguments then do not apply, and the samplers are diffusers' flow schedulers.
        weighting_scheme: Flow matching only (default ``logit_normal``): the noise-level density
            ``logit_normal`` or ``mode``, the loss weighting ``sigma_sqrt`` or ``cosmap`` (uniform
            levels), or ``none`` (uniform, unweighted); diffusers' ``training_utils`` functions.
        logit_mean: Mean of the ``logit_normal`` density.
        logit_std: Standard deviation of the ``logit_normal`` density.
        mode_scale: Scale of the ``mode`` density.
        flow_shift: Flow matching's resolution shift ``s -> shift * s / (1 + (shift - 1) * s)`` of the
            noise levels, in training and sampling (SD3 uses 3.0 at 1024 px; 1.0 leaves them).
        loss_type: ``l2``, ``l1`` or ``huber`` (pseudo-Huber).
        huber_c: Transition point of the pseudo-Huber loss.
        snr_gamma: Min-SNR-gamma loss weighting (5.0 is the paper's choice); ``None`` disables it.
        noise_offset: Add ``noise_offset * N(0, 1)`` per sample and channel to the noise (constant
            over the image), which lets a model learn very dark or bright images; 0.1 is common.
        input_perturbation: Noise the input with ``noise + input_perturbation * N(0, 1)`` while the
            target keeps ``noise`` (Ning et al. 2023, against exposure bias); 0.1 is common.
        learning_rate: Peak learning rate; it is set on every parameter group of the optimizer.
        optimizer: Optimizer factory taking parameter groups (weight decay is off for biases and
            normalization weights).
        lr_scheduler: LR scheduler factory taking the optimizer, stepped every optimizer step;
            ``None`` keeps the LR constant. ``lightning.pytorch.cli.ReduceLROnPlateau`` with
            ``monitor: val/loss`` is stepped on that metric after each validation instead.
        compile: ``torch.compile`` the denoiser when fitting starts.
        seed: Seed of the training noise, timesteps and condition dropout.
        sampler: Scheduler used by exported pipelines and ``predict``: one of ``ddpm``, ``ddim``,
            ``dpm``, ``euler``, ``euler_a``, ``unipc``.
        num_inference_steps: Default number of sampling steps.
        guidance_scale: Default classifier-free guidance scale (1 = none).
        nonfinite_loss: On a NaN or infinite training loss, ``raise`` (stop the run, naming the step
            and the loss) or ``skip`` (drop that optimizer step's gradients, warn, and go on).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rescale_betas_zero_snr: bool = False,
        prediction_type: PredictionType = "epsilon",
        weighting_scheme: WeightingScheme | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        flow_shift: float = 1.0,
        loss_type: LossType = "l2",
        huber_c: float = 0.1,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        learning_rate: float = 1e-4,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
        seed: int = 0,
        sampler: SamplerName = "dpm",
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        nonfinite_loss: NonFiniteLossMode = "raise",
    ) -> None:
        super().__init__()
        # The CLI checks these from the annotations; a Python caller is checked here.
        check_choice("loss_type", loss_type, LOSS_TYPES)
        check_choice("sampler", sampler, tuple(SCHEDULERS))
        self.init_nonfinite_guard(nonfinite_loss)
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma={snr_gamma!r} must be > 0, or None to disable min-SNR weighting.")
        if prediction_type == FLOW:
            weighting_scheme = weighting_scheme or "logit_normal"
            check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
            if snr_gamma is not None:
                raise ValueError(
                    f"snr_gamma={snr_gamma!r} applies to DDPM noise schedules; prediction_type='flow_prediction' "
                    f"weighs its loss by weighting_scheme (one of {list(WEIGHTING_SCHEMES)})."
                )
            if logit_std <= 0:
                raise ValueError(f"logit_std={logit_std!r} must be > 0.")
        elif weighting_scheme is not None:
            raise ValueError(
                f"weighting_scheme={weighting_scheme!r} applies to prediction_type='flow_prediction' only "
                f"(prediction_type={prediction_type!r}); use snr_gamma to weigh a DDPM objective."
            )
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate!r} must be > 0.")
        if noise_offset < 0:
            raise ValueError(f"noise_offset={noise_offset!r} must be >= 0.")
        if input_perturbation < 0:
            raise ValueError(f"input_perturbation={input_perturbation!r} must be >= 0.")
        if huber_c <= 0:
            raise ValueError(f"huber_c={huber_c!r} must be > 0.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be >= 1.")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be >= 0 (1 disables guidance).")
        self.noise_scheduler = training_scheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            flow_shift=flow_shift,
        )
        self.prediction_type = prediction_type
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.flow_shift = flow_shift
        self.loss_type = loss_type
        self.huber_c = huber_c
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.input_perturbation = input_perturbation
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile_network = compile
        self.seed = seed
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self._generator: torch.Generator | None = None
        self._rng_states_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what subclasses provide

    @abstractmethod
    def unpack_batch(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        """Split a batch into the clean sample ``x_0`` (what is noised) and its condition.

        ``generator`` is the step's seeded generator, for anything random in the unpacking (a
        latent model samples its VAE posterior with it).
        """

    @abstractmethod
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: Any) -> torch.Tensor:
        """The denoiser's prediction at ``(x_t, t)`` given the condition."""

    def drop_condition(self, condition: Any, generator: torch.Generator) -> Any:
        """Replace some conditions by the null condition (classifier-free guidance training)."""
        return condition

    @abstractmethod
    def build_pipeline(self, scheduler: str | None = None) -> Any:
        """A diffusers pipeline around the current weights, with the named sampling scheduler."""

    def condition_spec(self) -> ConditionSpec:
        """What this model can be asked to generate, for the sampling callbacks, ``evaluate`` and ``predict``.

        The default reads ``num_classes`` and ``class_names``; a model conditioned otherwise overrides it.
        """
        num_classes = getattr(self, "num_classes", None)
        if not isinstance(num_classes, int):
            raise NotImplementedError(f"{type(self).__name__} does not declare its conditioning (condition_spec).")
        names = getattr(self, "class_names", None)
        return ConditionSpec("class", num_classes=num_classes, class_names=tuple(names) if names else None)

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The network being trained (what EMA averages, ``compile`` compiles and export saves)."""

    # ------------------------------------------------------------------ the shared objective

    def generator(self, *keys: int) -> torch.Generator:
        """A generator on this module's device seeded by ``(seed, *keys)``."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(mix_seed(self.seed, *keys))
        return self._generator

    @property
    def is_flow(self) -> bool:
        """Whether this module trains by flow matching (``prediction_type="flow_prediction"``)."""
        return self.prediction_type == FLOW

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, stratified: bool = False) -> torch.Tensor:
        """Uniform integer timesteps; ``stratified`` spreads them evenly over ``[0, T)``.

        Flow matching: ``sigma * T`` (floats) with ``sigma`` from the ``weighting_scheme``'s density,
        shifted by ``flow_shift`` (``stratified``: one per equal-probability slice of the density).
        """
        steps = self.noise_scheduler.config.num_train_timesteps
        if self.is_flow:
            sigmas = flow_sigmas(
                batch_size, self.weighting_scheme, generator, logit_mean=self.logit_mean, logit_std=self.logit_std,
                mode_scale=self.mode_scale, shift=self.flow_shift, num_train_timesteps=steps, stratified=stratified,
                device=self.device,
            )  # fmt: skip
            return sigmas * steps
        if stratified:
            u = torch.rand(batch_size, generator=generator, device=self.device)
            t = ((torch.arange(batch_size, device=self.device) + u) * steps / batch_size).long()
            return t.clamp_(0, steps - 1)
        return torch.randint(0, steps, (batch_size,), generator=generator, device=self.device)

    def diffusion_step(
        self,
        sample: torch.Tensor,
        condition: Any,
        generator: torch.Generator,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> DiffusionStepOutput:
        """Noise ``sample`` at random (or given) timesteps, predict, and weigh the loss by ``sample_weights``."""
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            if self.noise_offset:
                offset = torch.randn(sample.shape[:2], generator=generator, device=sample.device, dtype=sample.dtype)
                noise = noise + self.noise_offset * offset.view(*sample.shape[:2], *([1] * (sample.ndim - 2)))
        if timesteps is None:
            timesteps = self.sample_timesteps(sample.shape[0], generator)
        input_noise = noise
        if self.input_perturbation:
            extra = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            input_noise = noise + self.input_perturbation * extra
        weights = None
        if self.is_flow:
            sigmas = timesteps.float() / self.noise_scheduler.config.num_train_timesteps
            noisy = flow_noise(sample, input_noise, sigmas)
            weights = flow_loss_weights(self.weighting_scheme, sigmas)
        else:
            noisy = self.noise_scheduler.add_noise(sample, input_noise, timesteps)
        prediction = self(noisy, timesteps, condition)
        target = training_target(self.noise_scheduler, sample, noise, timesteps, self.prediction_type)
        if self.snr_gamma is not None:
            weights = min_snr_weights(snr(self.noise_scheduler, timesteps), self.snr_gamma, self.prediction_type)
        if sample_weights is not None:
            weights = sample_weights if weights is None else weights * sample_weights
        loss, per_sample = diffusion_loss(
            prediction, target, loss_type=self.loss_type, weights=weights, huber_c=self.huber_c
        )
        return DiffusionStepOutput(loss, per_sample.detach(), timesteps, noisy, prediction, target)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        generator = self.generator(self.current_epoch, batch_idx, self.global_rank)
        sample, condition = self.unpack_batch(batch, generator)
        condition = self.drop_condition(condition, generator)
        out = self.diffusion_step(sample, condition, generator)
        # sync_dist: the logged loss is the mean over processes, not rank 0's alone (one all-reduce per step).
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=sample.shape[0])
        return {"loss": out.loss, "per_sample_loss": out.per_sample_loss, "timesteps": out.timesteps}

    def evaluation_output(self, batch: Any, batch_idx: int) -> DiffusionStepOutput:
        """The loss on fixed noise and stratified timesteps per batch index: the same every epoch and run."""
        generator = self.generator(0x5EED, batch_idx, self.global_rank)
        sample, condition = self.unpack_batch(batch, generator)
        timesteps = self.sample_timesteps(sample.shape[0], generator, stratified=True)
        return self.diffusion_step(sample, condition, generator, timesteps=timesteps)

    def _evaluation_step(self, batch: Any, batch_idx: int, stage: str) -> DiffusionStepOutput:
        out = self.evaluation_output(batch, batch_idx)
        if stage == "val":
            self.record_eval_loss(out.loss)
        size = out.timesteps.shape[0]
        self.log(f"{stage}/loss", out.loss, prog_bar=stage == "val", sync_dist=True, batch_size=size)
        return out

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = self._evaluation_step(batch, batch_idx, "val")
        return {"loss": out.loss, "per_sample_loss": out.per_sample_loss, "timesteps": out.timesteps}

    @override
    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = self._evaluation_step(batch, batch_idx, "test")
        return {"loss": out.loss, "per_sample_loss": out.per_sample_loss, "timesteps": out.timesteps}

    # ------------------------------------------------------------------ prediction

    def predict_conditions(self, batch: Any) -> Conditions:
        """The conditions of a predict batch: ``{"labels": (B,)}`` (or a label tensor) or ``{"prompts": [...]}``."""
        spec = self.condition_spec()
        if isinstance(batch, dict) and "prompts" in batch:
            return spec.resolve(prompts=list(batch["prompts"]), negative_prompts=batch.get("negative_prompts"))
        labels = batch["labels"] if isinstance(batch, dict) else batch
        return spec.resolve(classes=torch.as_tensor(labels).reshape(-1).tolist())

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Generate one image per condition of the batch with the module's sampler, steps and guidance.

        Image ``i`` of the batch comes from a CPU generator seeded by ``(seed, index)``, where the
        index is the batch's ``index`` entry when it has one (its place in the whole predict set),
        else ``(batch_idx, i, rank)``: the same image on any device, whatever the batch size.
        Returns ``images`` (``(B, C, H, W)`` in ``[0, 1]``, CPU), ``conditions`` (one JSON-ready dict
        per image), ``seeds`` and ``labels`` or ``prompts``.
        """
        conditions = self.predict_conditions(batch)
        index = batch.get("index") if isinstance(batch, dict) else None
        if index is not None:
            seeds = [mix_seed(self.seed, 0x9E4D, int(k)) for k in torch.as_tensor(index).tolist()]
        else:
            seeds = [mix_seed(self.seed, 0x9E4D, batch_idx, i, self.global_rank) for i in range(len(conditions))]
        pipeline = self.build_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        images = generate(
            pipeline,
            conditions,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            image_size=getattr(self, "image_size", None),
        )
        key = "labels" if conditions.kind == "class" else "prompts"
        values = torch.tensor(conditions.values) if conditions.kind == "class" else list(conditions.values)
        return {"images": images, "conditions": conditions.as_records(), "seeds": seeds, key: values}

    # ------------------------------------------------------------------ optimization

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split into decayed weights and undecayed biases/norm weights."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay, "lr": self.learning_rate}]
        if no_decay:
            groups.append({"params": no_decay, "lr": self.learning_rate, "weight_decay": 0.0})
        return groups

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        return optimizer_config(optimizer, self.lr_scheduler_factory, self.trainer)

    @override
    def on_fit_start(self) -> None:
        if self.compile_network:
            self.denoiser.compile()

    # ------------------------------------------------------------------ checkpoints and export

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["diffusion_lightning"] = {
            "module_class": f"{cls.__module__}.{cls.__qualname__}",
            **self.nonfinite_state(),
        }
        checkpoint["rng_states"] = collect_rng_states()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get("rng_states")
        self.load_nonfinite_state(checkpoint.get("diffusion_lightning"))

    @override
    def on_train_start(self) -> None:
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def export_pipeline(
        self, path: str | os.PathLike[str], scheduler: str | None = None, card: ModelCardOptions | None = None
    ) -> Path:
        """Save a ready-to-load diffusers pipeline folder with its model card, atomically.

        The folder appears only once complete: it is written next to ``path`` and renamed into
        place, so an interrupted export never leaves a folder that ``from_pretrained`` accepts. It
        holds the card ``README.md`` (see :mod:`diffusion_lightning.utils.model_card`; ``card`` gives
        its license, the run it describes and whether to draw ``samples.png``) and, for a pipeline
        class of this package, the class's module as ``pipeline.py``, so that diffusers alone loads
        it with ``custom_pipeline``; and the module's steps and guidance in ``sampling_defaults.json``
        (see :mod:`diffusion_lightning.pipelines.sampling_defaults`).
        """
        pipeline = self.build_pipeline(scheduler)
        with atomic_directory(path) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
            save_pipeline_code(pipeline, tmp)
            write_sampling_defaults(tmp, self)
            write_model_card(tmp, self, path, "pipeline", pipeline, card)
        return Path(path)

    def sampling_scheduler(self, name: str | None = None):
        """The named sampling scheduler (default: ``sampler``) with the training noise schedule."""
        return make_scheduler(name or self.sampler, self.noise_scheduler.config)
