"""Distillation of a frozen class-conditioned teacher: smaller students, and fewer sampling steps.

- :class:`KnowledgeDistillationModule`: a student UNet (the teacher's architecture scaled by a
  size factor, :func:`~diffusion_lightning.nets.students.build_student`) regresses both the
  teacher's prediction and the true target at the same noisy input and timestep, optionally
  also the teacher's decoder features (BK-SDM, Kim et al. 2023).
- :class:`~diffusion_lightning.modules.progressive.ProgressiveDistillationModule` (its own
  module) builds on the same teacher-student base: Salimans & Ho step distillation.

The teacher comes from a checkpoint (EMA weights by default) or an exported pipeline folder; it
is frozen, kept out of checkpoints and reloaded from its source when a checkpoint is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from diffusion_lightning.losses import FLOW, PredictionType, check_choice
from diffusion_lightning.modules.base import DiffusionModule, DiffusionStepOutput
from diffusion_lightning.modules.ddpm import drop_class_labels
from diffusion_lightning.modules.loading import load_pipeline_source, source_kind
from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline
from diffusion_lightning.schedulers import flow_shift_of, is_flow

__all__ = ["TEACHER_WEIGHTS", "KnowledgeDistillationModule", "Teacher", "TeacherWeights", "load_teacher"]

#: Which weights of a checkpoint teacher: its EMA average or the raw trained ones.
TeacherWeights = Literal["ema", "raw"]
TEACHER_WEIGHTS: tuple[str, ...] = get_args(TeacherWeights)


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
        if is_flow(self.scheduler_config):
            return FLOW
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)


def load_teacher(path: str | os.PathLike[str], weights: TeacherWeights = "ema") -> Teacher:
    """The teacher in ``path``: a ``.ckpt`` written by ``fit`` or an exported pipeline folder.

    Raises:
        FileNotFoundError: When ``path`` is neither.
        ValueError: When it holds no class-conditioned model.
    """
    kind = source_kind(path)
    if kind is None:
        raise FileNotFoundError(
            f"teacher={str(path)!r} is neither a checkpoint file (.ckpt written by fit) nor an exported pipeline "
            "folder (with model_index.json)."
        )
    checkpoint = kind == "ckpt"
    pipeline, defaults = load_pipeline_source(
        ckpt=path if checkpoint else None,
        pipeline=None if checkpoint else path,
        weights=weights,
        expect=ClassConditionedPipeline,
    )
    config = {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")}
    names = pipeline.config.get("class_names")
    return Teacher(pipeline.unet, config, pipeline.num_classes, names, float(defaults["guidance_scale"]))


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class _TeacherStudentModule(DiffusionModule):
    """What both distillations share: a frozen teacher kept out of checkpoints, a class-conditioned student."""

    def __init__(
        self,
        teacher: str,
        teacher_weights: TeacherWeights,
        p_uncond: float,
        num_classes: int | None,
        image_size: int | None,
        in_channels: int | None,
        class_names: list[str] | None,
        prediction_type: PredictionType | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("teacher_weights", teacher_weights, TEACHER_WEIGHTS)  # the CLI checks the annotation
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
        if source.prediction_type == FLOW:  # the student trains on the teacher's noise levels
            kwargs["flow_shift"] = flow_shift_of(schedule)
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
        teacher_weights: TeacherWeights = "ema",
        p_uncond: float = 0.1,
        num_classes: int | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        class_names: list[str] | None = None,
        prediction_type: PredictionType | None = None,
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
