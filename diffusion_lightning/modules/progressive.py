"""Salimans & Ho (2022) progressive distillation of DDIM sampling steps, in PyTorch.

The authors' code is JAX only. A student initialised from the teacher learns to do in one DDIM
step what the teacher does in two; each round's student becomes the next round's teacher and the
step count halves (64 -> 32 -> ... -> 4), every round exported as a pipeline. The teacher handling
(checkpoint or pipeline, frozen, kept out of checkpoints) is shared with knowledge distillation.

A flow-matching teacher is distilled the same way with Euler steps in place of DDIM steps (the
deterministic DDIM step of a rectified flow is its Euler step): neither diffusers nor the paper
has this variant, so it is written here too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from diffusion_lightning.losses import PredictionType, check_choice
from diffusion_lightning.modules.base import DiffusionModule, DiffusionStepOutput
from diffusion_lightning.modules.distill import TeacherWeights, _TeacherStudentModule

__all__ = ["LossWeighting", "ProgressiveDistillationModule", "predict_x0"]

#: Weightings of the x-space loss of progressive distillation.
LossWeighting = Literal["truncated_snr", "snr_plus_one", "none"]


def predict_x0(
    output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, kind: str
) -> torch.Tensor:
    """The clean sample implied by a network output of ``kind`` at ``z = alpha x + sigma eps``."""
    if kind == "epsilon":
        return (z - sigma * output) / alpha
    if kind == "v_prediction":
        return alpha * z - sigma * output
    return output


class ProgressiveDistillationModule(_TeacherStudentModule):
    """Salimans & Ho (2022) progressive distillation of DDIM sampling steps.

    The student starts as a copy of the teacher. DDPM schedules: for a student step from ``t`` (on the ``N``-step
    DDIM grid) to ``t'' = t - T // N`` (where diffusers' DDIM step lands, so the exported DDIM
    pipeline samples exactly the transitions trained) the teacher takes two deterministic DDIM
    steps ``t -> t' -> t''`` with ``t' = t - T // 2N``; the student's target is the clean sample
    ``x~`` for which one DDIM step from ``z_t`` lands on the teacher's ``z_t''``. The loss is the x-space MSE
    weighted by ``max(SNR, 1)`` (``truncated_snr``, the paper's choice), ``snr_plus_one`` or ``none``.

    Flow matching (``prediction_type="flow_prediction"``): the student's grid is that of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` with ``shift_terminal = 1/N``, so its ``N`` noise levels are
    ``1, 1 - 1/N, ..., 1/N`` and the ``N``- and ``2N``-step grids are nested. The grid is uniform
    whatever the teacher's ``flow_shift`` (diffusers' shifted grids are not nested across ``N`` and
    ``2N``); the student learns the steps of the grid it is given. For a student step
    ``sigma -> sigma''`` the teacher takes two Euler steps through the ``2N``-step grid's point
    between them, and the student's target is the velocity of the straight line from ``z`` to the
    teacher's landing point, ``(z'' - z) / (sigma'' - sigma)``. The loss is the same x-space MSE
    and weighting, with ``x = z - sigma v`` and ``SNR = ((1 - sigma) / sigma)^2``.
    Each round is exported with that Euler scheduler, which samples exactly the trained transitions.

    Training runs ``rounds`` rounds of ``steps_per_round`` optimizer steps: round ``r``'s student
    samples in ``teacher_steps / 2**(r+1)`` steps and becomes round ``r+1``'s teacher. At the end
    of each round (rank 0) the student is exported to
    ``<default_root_dir>/rounds/steps=<N>/`` with a DDIM scheduler (flow matching: the Euler scheduler
    above), recording ``N`` steps and the guidance scale in its ``sampling_defaults.json``.

    Args:
        teacher: A checkpoint or pipeline folder of a class-conditioned model: v-prediction (suits a DDPM schedule
            best) or flow matching.
        teacher_steps: DDIM (flow: Euler) steps of the original teacher (a power of two times the final count).
        rounds: Number of halvings (64 with 4 rounds ends at 4 steps).
        steps_per_round: Optimizer steps of each round; ``max_steps`` should be ``rounds * steps_per_round``.
        loss_weighting: ``truncated_snr``, ``snr_plus_one`` or ``none``.
        teacher_weights: ``ema`` or ``raw`` weights of a checkpoint teacher.
        p_uncond: Probability of the null class (the teacher's unconditional branch is distilled too).
        num_classes: Linked from the data module; must equal the teacher's.
        image_size: Linked from the data module; must equal the teacher's.
        in_channels: Linked from the data module; must equal the teacher's.
        class_names: Linked from the data module (default the teacher's).
        prediction_type: Must equal the teacher's when given (default: the teacher's).
        **kwargs: Training-core options; noise schedule and prediction type are the teacher's.
    """

    WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)

    def __init__(
        self,
        teacher: str,
        teacher_steps: int = 64,
        rounds: int = 4,
        steps_per_round: int = 500,
        loss_weighting: LossWeighting = "truncated_snr",
        teacher_weights: TeacherWeights = "ema",
        p_uncond: float = 0.1,
        num_classes: int | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        class_names: list[str] | None = None,
        prediction_type: PredictionType | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("loss_weighting", loss_weighting, self.WEIGHTINGS)  # the CLI checks the annotation
        if rounds < 1 or steps_per_round < 1:
            raise ValueError(f"rounds={rounds!r} and steps_per_round={steps_per_round!r} must be >= 1.")
        if teacher_steps % 2**rounds:
            raise ValueError(f"teacher_steps={teacher_steps!r} must be divisible by 2**rounds = {2**rounds}.")
        kwargs.setdefault("sampler", "ddim")
        kwargs["num_inference_steps"] = teacher_steps // 2
        super().__init__(
            teacher,
            teacher_weights,
            p_uncond,
            num_classes,
            image_size,
            in_channels,
            class_names,
            prediction_type,
            **kwargs,
        )
        if self.is_flow and self.sampler == "ddim":
            self.sampler = "euler"  # what the exported rounds sample with (see sampling_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.unet = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.teacher_steps = teacher_steps
        self.rounds = rounds
        self.steps_per_round = steps_per_round
        self.loss_weighting = loss_weighting
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        self._exported_round = -1

    @property
    def student_steps(self) -> int:
        """Sampling steps of the current round's student."""
        return self.teacher_steps // 2 ** (int(self.round) + 1)

    def _ddim(self) -> Any:
        """DDIM with ``trailing`` timestep spacing: the first step starts at ``t = T - 1``.

        diffusers' default ``leading`` spacing starts an ``N``-step sampler at ``T - T/N`` (``t = 750``
        for 4 steps), where the training marginal still holds a large share of signal while the
        sampler feeds pure noise; a few-step student trained on that grid cannot repair the mismatch.
        Salimans & Ho start every round from pure noise, which ``trailing`` spacing reproduces.
        """
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing="trailing")

    def _flow_euler(self, steps: int | None = None) -> Any:
        """Flow Euler whose ``steps``-step grid (default: the student's) is ``1, 1 - 1/N, ..., 1/N``.

        diffusers' default grid ``linspace(1, 1/T, N)`` spends its last step between ``1/T`` and 0 and
        is not nested across ``N`` and ``2N``; ``shift_terminal = 1/N`` stretches it to end at ``1/N``.
        A ``shift`` other than 1 is applied before that stretch and would break the nesting again.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        steps = steps or self.student_steps
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps, shift=1.0, shift_terminal=1.0 / steps
        )

    @override
    def sampling_scheduler(self, name: str | None = None):
        if self.is_flow:
            return self._flow_euler() if name in (None, "euler") else super().sampling_scheduler(name)
        return self._ddim() if name in (None, "ddim") else super().sampling_scheduler(name)

    def flow_transitions(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise levels ``(sigma, sigma', sigma'')`` of flow student step ``index``: ``sigma`` and ``sigma''`` on
        the student's ``N``-step Euler grid, the teacher's midpoint ``sigma'`` the ``2N``-step grid's point between."""
        grids = []
        for steps in (self.student_steps, 2 * self.student_steps):
            euler = self._flow_euler(steps)
            euler.set_timesteps(steps)
            grids.append(euler.sigmas.to(self.device))
        return grids[0][index], grids[1][2 * index + 1], grids[0][index + 1]

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at timesteps ``t``; ``t < 0`` is DDIM's final step (its ``final_alpha_cumprod``)."""
        ddim = self._ddim()
        cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        final = torch.as_tensor(ddim.final_alpha_cumprod, dtype=cumprod.dtype, device=self.device)
        a = torch.where(t >= 0, cumprod[t.clamp(min=0)], final)
        return a.sqrt().view(-1, 1, 1, 1), (1 - a).clamp(min=0).sqrt().view(-1, 1, 1, 1)

    def transitions(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps ``(t, t', t'')`` of student step ``index``: ``t`` on DDIM's ``N``-step grid, ``t''``
        where diffusers' DDIM step lands (``t - T // N``), the teacher's midpoint ``t' = t - T // 2N``."""
        ddim = self._ddim()
        n = self.student_steps
        ddim.set_timesteps(n)
        t = ddim.timesteps.to(self.device)[index]
        total = self.noise_scheduler.config.num_train_timesteps
        return t, t - total // (2 * n), t - total // n

    @override
    def diffusion_step(
        self,
        sample: torch.Tensor,
        condition: Any,
        generator: torch.Generator,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> DiffusionStepOutput:
        batch = sample.shape[0]
        index = torch.randint(0, self.student_steps, (batch,), generator=generator, device=self.device)
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        if self.is_flow:
            return self._flow_step(sample, condition, index, noise)
        t, t1, t2 = self.transitions(index)
        (a, s), (a1, s1), (a2, s2) = self._alpha_sigma(t), self._alpha_sigma(t1), self._alpha_sigma(t2)
        z = a * sample + s * noise
        kind = self.prediction_type
        with torch.no_grad():  # two deterministic DDIM steps of the teacher: t -> t' -> t''
            x = predict_x0(self.teacher_forward(z, t, condition), z, a, s, kind)
            z1 = a1 * x + s1 * (z - a * x) / s
            x1 = predict_x0(self.teacher_forward(z1, t1.clamp(min=0), condition), z1, a1, s1, kind)
            z2 = a2 * x1 + s2 * (z1 - a1 * x1) / s1.clamp(min=1e-8)
            ratio = s2 / s  # the x~ for which one DDIM step from z lands on z2
            target = (z2 - ratio * z) / (a2 - ratio * a)
        prediction = self(z, t, condition)
        x_student = predict_x0(prediction, z, a, s, kind)
        per_sample = (x_student.float() - target.float()).pow(2).flatten(1).mean(1)
        loss = self._weighted(per_sample, (a / s).pow(2).flatten())
        return DiffusionStepOutput(loss, per_sample.detach(), t, z, prediction, target)

    def _weighted(self, per_sample: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        weights = {"truncated_snr": snr.clamp(min=1), "snr_plus_one": snr + 1, "none": torch.ones_like(snr)}
        return (weights[self.loss_weighting] * per_sample).mean()

    def _flow_step(
        self, sample: torch.Tensor, condition: Any, index: torch.Tensor, noise: torch.Tensor
    ) -> DiffusionStepOutput:
        """Flow matching: the student's one Euler step matches the teacher's two (see the class docstring)."""
        sigma, mid, end = self.flow_transitions(index)
        total = self.noise_scheduler.config.num_train_timesteps
        s, m, e = (v.view(-1, 1, 1, 1).to(sample.dtype) for v in (sigma, mid, end))
        z = (1.0 - s) * sample + s * noise
        with torch.no_grad():  # two Euler steps of the teacher: sigma -> sigma' -> sigma''
            z1 = z + (m - s) * self.teacher_forward(z, sigma * total, condition)
            z2 = z1 + (e - m) * self.teacher_forward(z1, mid * total, condition)
            target = (z2.float() - z.float()) / (e - s).float()  # the velocity of one step from z to z2
        prediction = self(z, sigma * total, condition)
        # x-space error of x = z - sigma * v, as for DDPM schedules: sigma^2 times the velocity error
        per_sample = (s.float() * (prediction.float() - target)).pow(2).flatten(1).mean(1)
        loss = self._weighted(per_sample, ((1.0 - sigma) / sigma).pow(2).float())
        return DiffusionStepOutput(loss, per_sample.detach(), sigma * total, z, prediction, target)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        finished = self.global_step // self.steps_per_round
        if self.global_step and self.global_step % self.steps_per_round == 0 and finished > int(self.round):
            self._finish_round()

    @override
    def on_train_end(self) -> None:
        if self.global_step and self.global_step >= (int(self.round) + 1) * self.steps_per_round:
            self._export_round()

    def _finish_round(self) -> None:
        self._export_round()
        if int(self.round) + 1 < self.rounds:
            self.teacher.load_state_dict(self.unet.state_dict())  # the student teaches the next round
            self.round += 1
            self.num_inference_steps = self.student_steps

    @rank_zero_only
    def _export_round(self) -> None:
        if self._exported_round == int(self.round) or self.trainer is None:
            return
        self._exported_round = int(self.round)
        path = Path(self.trainer.default_root_dir) / "rounds" / f"steps={self.student_steps}"
        self.export_pipeline(path)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher of a later round is an earlier student: keep it, it cannot be rebuilt from the source.
        DiffusionModule.on_save_checkpoint(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        DiffusionModule.on_load_checkpoint(self, checkpoint)
        self.num_inference_steps = self.teacher_steps // 2 ** (int(checkpoint["state_dict"]["round"]) + 1)
