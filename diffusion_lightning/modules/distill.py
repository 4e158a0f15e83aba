"""Distillation of a frozen class-conditioned teacher: smaller students, and fewer sampling steps.

- :class:`KnowledgeDistillationModule`: a student UNet (the teacher's architecture scaled by a
  size factor, :func:`~diffusion_lightning.nets.students.build_student`) regresses both the
  teacher's prediction and the true target at the same noisy input and timestep, optionally
  also the teacher's decoder features (BK-SDM, Kim et al. 2023).
- :class:`ProgressiveDistillationModule`: Salimans & Ho (2022) step distillation, in PyTorch (the
  authors' code is JAX): a student initialised from the teacher learns to do in one DDIM step
  what the teacher does in two; each round's student becomes the next round's teacher and the
  step count halves (64 -> 32 -> ... -> 4), every round exported as a pipeline.

The teacher comes from a checkpoint (EMA weights by default) or an exported pipeline folder; it
is frozen, kept out of checkpoints and reloaded from its source when a checkpoint is loaded.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule, DiffusionStepOutput
from diffusion_lightning.modules.ddpm import drop_class_labels
from diffusion_lightning.nets.unet import num_classes_of
from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline

__all__ = ["KnowledgeDistillationModule", "ProgressiveDistillationModule", "Teacher", "load_teacher"]


@dataclass
class Teacher:
    """A frozen teacher: its network, noise-schedule config and what its conditioning is."""

    unet: nn.Module
    scheduler_config: dict[str, Any]
    num_classes: int
    class_names: list[str] | None
    guidance_scale: float = 2.0

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)


def load_teacher(path: str | os.PathLike[str], weights: str = "ema") -> Teacher:
    """The teacher in ``path``: a ``.ckpt`` written by ``fit`` or an exported pipeline folder."""
    source = Path(path)
    if source.is_file():
        from diffusion_lightning.utils.checkpoint import load_module

        module = load_module(source, weights=weights)
        unet = getattr(module, "unet", None)
        if unet is None:
            raise ValueError(f"teacher={str(path)!r} holds a {type(module).__name__}, which has no unet to distil.")
        config = {k: v for k, v in module.noise_scheduler.config.items() if not k.startswith("_")}
        names = getattr(module, "class_names", None)
        return Teacher(unet, config, num_classes_of(unet), names, float(module.guidance_scale))
    if (source / "model_index.json").is_file():
        pipeline = ClassConditionedPipeline.from_pretrained(source)
        config = {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")}
        return Teacher(pipeline.unet, config, pipeline.num_classes, pipeline.config.get("class_names"))
    raise FileNotFoundError(
        f"teacher={str(path)!r} is neither a checkpoint file (.ckpt written by fit) nor an exported pipeline "
        "folder (with model_index.json)."
    )


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class _TeacherStudentModule(DiffusionModule):
    """What both distillations share: a frozen teacher kept out of checkpoints, a class-conditioned student."""

    def __init__(
        self,
        teacher: str,
        teacher_weights: str,
        p_uncond: float,
        num_classes: int | None,
        image_size: int | None,
        in_channels: int | None,
        class_names: list[str] | None,
        prediction_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("teacher_weights", teacher_weights, ("ema", "raw"))
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond={p_uncond!r} must be in [0, 1).")
        source = load_teacher(teacher, teacher_weights)
        mismatches = [
            f"{name}: data/student {mine!r} vs teacher {theirs!r}"
            for name, mine, theirs in (
                ("num_classes", num_classes, source.num_classes),
                ("image_size", image_size, source.sample_size),
                ("in_channels", in_channels, source.channels),
                ("prediction_type", prediction_type, source.prediction_type),
            )
            if mine is not None and mine != theirs
        ]
        if mismatches:
            raise ValueError("the student's conditioning does not match the teacher's: " + "; ".join(mismatches))
        schedule = source.scheduler_config
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr"):
            if key in schedule:
                kwargs[key] = schedule[key]
        kwargs["prediction_type"] = source.prediction_type
        kwargs.setdefault("guidance_scale", source.guidance_scale)
        super().__init__(**kwargs)
        self.teacher_source = source
        self.teacher = _freeze(source.unet)
        self.num_classes = source.num_classes
        self.class_names = class_names or source.class_names
        self.p_uncond = p_uncond

    @property
    @override
    def denoiser(self) -> nn.Module:
        return self.unet

    @override
    def train(self, mode: bool = True) -> _TeacherStudentModule:
        super().train(mode)
        self.teacher.eval()
        return self

    @override
    def unpack_batch(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["images"], batch["labels"]

    @override
    def drop_condition(self, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return drop_class_labels(condition, self.p_uncond, self.num_classes, generator)

    @override
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, class_labels=condition).sample

    @torch.no_grad()
    def teacher_forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.teacher(noisy, timesteps, class_labels=condition).sample

    @override
    def build_pipeline(self, scheduler: str | None = None) -> ClassConditionedPipeline:
        return ClassConditionedPipeline(
            unet=self.unet, scheduler=self.sampling_scheduler(scheduler), class_names=self.class_names
        )

    def _teacher_keys(self) -> set[str]:
        return {k for k in self.state_dict() if k.startswith("teacher.")}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        frozen = self._teacher_keys()
        for field in ("state_dict", "current_model_state"):
            if field in checkpoint:
                checkpoint[field] = {k: v for k, v in checkpoint[field].items() if k not in frozen}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Complete the weights with the teacher's, reloaded from its source by ``__init__``."""
        super().on_load_checkpoint(checkpoint)
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith("teacher.")}
        for field in ("state_dict", "current_model_state"):
            if field in checkpoint and not any(k.startswith("teacher.") for k in checkpoint[field]):
                checkpoint[field] = {**frozen, **checkpoint[field]}


class KnowledgeDistillationModule(_TeacherStudentModule):
    """Train a smaller student on ``alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, target)``.

    Both terms are computed at the same noisy input, timestep and (possibly dropped) class; the
    task term keeps the module's loss type and min-SNR weighting. With ``feature_weight > 0`` the
    outputs of the decoder blocks named in ``feature_layers`` are matched too (through 1x1
    projections when the student is narrower; the projections train with the student and are not
    exported). ``train/loss_distill``, ``train/loss_task`` and ``train/loss_feature`` are logged.

    Args:
        teacher: A checkpoint (``.ckpt``) or pipeline folder of a class-conditioned model.
        size_factor: The student's parameters as a fraction of the teacher's, in ``[0.01, 1]``.
        scale_depth: Also scale ``layers_per_block`` with the factor.
        min_channels: Floor of every student width (and at least the group-norm groups).
        alpha: Weight of the distillation term, in ``[0, 1]`` (1: teacher only, 0: data only).
        feature_weight: Weight of the feature term (0 disables it).
        feature_layers: Decoder blocks whose outputs are matched (default every ``up_blocks.<i>``).
        teacher_weights: ``ema`` or ``raw`` weights of a checkpoint teacher.
        p_uncond: Probability of the null class (as the teacher was trained).
        num_classes: Linked from the data module; must equal the teacher's.
        image_size: Linked from the data module; must equal the teacher's.
        in_channels: Linked from the data module; must equal the teacher's.
        class_names: Linked from the data module (default the teacher's).
        prediction_type: Must equal the teacher's when given (default: the teacher's).
        **kwargs: Training-core options (learning rate, optimizer, sampler, ...); the noise
            schedule and prediction type are the teacher's.
    """

    def __init__(
        self,
        teacher: str,
        size_factor: float = 0.5,
        scale_depth: bool = False,
        min_channels: int = 8,
        alpha: float = 0.5,
        feature_weight: float = 0.0,
        feature_layers: list[str] | None = None,
        teacher_weights: str = "ema",
        p_uncond: float = 0.1,
        num_classes: int | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        class_names: list[str] | None = None,
        prediction_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be in [0, 1].")
        if feature_weight < 0:
            raise ValueError(f"feature_weight={feature_weight!r} must be >= 0.")
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
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        from diffusion_lightning.nets.students import build_student

        self.unet = build_student(self.teacher, size_factor, scale_depth=scale_depth, min_channels=min_channels)
        self.alpha = alpha
        self.feature_weight = feature_weight
        up_blocks = [f"up_blocks.{i}" for i in range(len(self.teacher.up_blocks))]
        self.feature_layers = list(feature_layers or up_blocks) if feature_weight > 0 else []
        unknown = sorted(set(self.feature_layers) - set(up_blocks))
        if unknown:
            raise ValueError(f"feature_layers has {unknown}; the teacher's decoder blocks are {up_blocks}.")
        self.projections = nn.ModuleDict()
        for name in self.feature_layers:
            index = int(name.split(".")[1])
            c_student = self.unet.up_blocks[index].resnets[-1].out_channels
            c_teacher = self.teacher.up_blocks[index].resnets[-1].out_channels
            if c_student != c_teacher:
                self.projections[name.replace(".", "_")] = nn.Conv2d(c_student, c_teacher, 1)
        self._features: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._hooks: list[Any] = []
        self._terms: dict[str, torch.Tensor] = {}

    def _install_hooks(self) -> None:
        if self._hooks or not self.feature_layers:
            return
        for role, net in (("student", self.unet), ("teacher", self.teacher)):
            for name in self.feature_layers:
                block = net.get_submodule(name)

                def hook(_module: nn.Module, _inputs: Any, output: Any, role: str = role, name: str = name) -> None:
                    self._features[role][name] = output[0] if isinstance(output, tuple) else output

                self._hooks.append(block.register_forward_hook(hook))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._install_hooks()

    @override
    def on_fit_end(self) -> None:
        self._remove_hooks()

    @override
    def diffusion_step(
        self,
        sample: torch.Tensor,
        condition: Any,
        generator: torch.Generator,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> DiffusionStepOutput:
        out = super().diffusion_step(sample, condition, generator, timesteps, noise)
        teacher = self.teacher_forward(out.noisy, out.timesteps, condition)
        distill = F.mse_loss(out.prediction.float(), teacher.float())
        feature = out.loss.new_zeros(())
        if self.feature_layers and self._hooks:
            for name in self.feature_layers:
                student, key = self._features["student"].pop(name), name.replace(".", "_")
                if key in self.projections:  # a narrower student: 1x1 projection to the teacher's width
                    student = self.projections[key](student)
                feature = feature + F.mse_loss(student.float(), self._features["teacher"].pop(name).float().detach())
            feature = feature / len(self.feature_layers)
        task = out.loss
        self._terms = {"distill": distill.detach(), "task": task.detach(), "feature": feature.detach()}
        total = self.alpha * distill + (1 - self.alpha) * task + self.feature_weight * feature
        return DiffusionStepOutput(total, out.per_sample_loss, out.timesteps, out.noisy, out.prediction, out.target)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        result = super().training_step(batch, batch_idx)
        size = result["timesteps"].shape[0]
        for name, value in self._terms.items():
            self.log(f"train/loss_{name}", value, sync_dist=True, batch_size=size)
        return result


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

    WEIGHTINGS = ("truncated_snr", "snr_plus_one", "none")

    def __init__(
        self,
        teacher: str,
        teacher_steps: int = 64,
        rounds: int = 4,
        steps_per_round: int = 500,
        loss_weighting: str = "truncated_snr",
        teacher_weights: str = "ema",
        p_uncond: float = 0.1,
        num_classes: int | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        class_names: list[str] | None = None,
        prediction_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("loss_weighting", loss_weighting, self.WEIGHTINGS)
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
