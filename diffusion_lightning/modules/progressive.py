"""Salimans & Ho (2022) progressive distillation of DDIM sampling steps, in PyTorch.

The authors' code is JAX only. A student initialised from the teacher learns to do in one DDIM
step what the teacher does in two; each round's student becomes the next round's teacher and the
step count halves (64 -> 32 -> ... -> 4), every round exported as a pipeline. The teacher handling
(checkpoint or pipeline, frozen, kept out of checkpoints) is shared with knowledge distillation.
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

    The student starts as a copy of the teacher. For a student step from ``t`` (on the ``N``-step
    DDIM grid) to ``t'' = t - T // N`` (where diffusers' DDIM step lands, so the exported DDIM
    pipeline samples exactly the transitions trained) the teacher takes two deterministic DDIM
    steps ``t -> t' -> t''`` with ``t' = t - T // 2N``; the student's target is the clean sample
    ``x~`` for which one DDIM step from ``z_t`` lands on the teacher's ``z_t''``. The loss is the x-space MSE
    weighted by ``max(SNR, 1)`` (``truncated_snr``, the paper's choice), ``snr_plus_one`` or ``none``.

    Training runs ``rounds`` rounds of ``steps_per_round`` optimizer steps: round ``r``'s student
    samples in ``teacher_steps / 2**(r+1)`` steps and becomes round ``r+1``'s teacher. At the end
    of each round (rank 0) the student is exported to
    ``<default_root_dir>/rounds/steps=<N>/`` with a DDIM scheduler set to ``N`` steps.

    Args:
        teacher: A checkpoint or pipeline folder of a class-conditioned model (v-prediction suits it best).
        teacher_steps: DDIM steps of the original teacher (a power of two times the final count).
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
        if self.is_flow:
            raise ValueError(
                f"teacher={teacher!r} is a flow-matching model (prediction_type='flow_prediction'); progressive "
                "distillation halves DDIM steps on a DDPM noise schedule and does not apply to it. Distil it into a "
                "smaller student with KnowledgeDistillationModule, or sample it with fewer flow steps."
            )
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

    @override
    def sampling_scheduler(self, name: str | None = None):
        return self._ddim() if name in (None, "ddim") else super().sampling_scheduler(name)

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
        t, t1, t2 = self.transitions(index)
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
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
        snr = (a / s).pow(2).flatten()
        weights = {"truncated_snr": snr.clamp(min=1), "snr_plus_one": snr + 1, "none": torch.ones_like(snr)}
        loss = (weights[self.loss_weighting] * per_sample).mean()
        return DiffusionStepOutput(loss, per_sample.detach(), t, z, prediction, target)

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
