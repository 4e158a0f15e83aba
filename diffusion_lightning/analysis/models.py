"""Load a teacher and its students, check they share the conditioning, and draw the shared inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_lightning.modules.loading import PIPELINE_DEFAULTS, load_pipeline_source
from diffusion_lightning.pipelines.class_conditioned import ClassConditionedPipeline
from diffusion_lightning.schedulers import is_flow, make_scheduler

__all__ = ["CONDITIONING_FIELDS", "Model", "Session", "check_conditioning", "load_model", "load_models"]

#: What a student must share with its teacher to be compared on the same inputs.
CONDITIONING_FIELDS = ("num_classes", "prediction_type", "sample_size", "in_channels", "out_channels")
#: Guidance scale of a pipeline folder that records none (no ``sampling_defaults.json``).
DEFAULT_GUIDANCE = PIPELINE_DEFAULTS["guidance_scale"]
ACCEPTED_FORMS = "a .ckpt file written by fit, or a pipeline folder with model_index.json (from export/save_pretrained)"


@dataclass
class Model:
    """A class-conditioned pipeline under analysis.

    Args:
        name: Label in tables and figures.
        path: Where it was loaded from.
        pipeline: The pipeline, with a DDIM scheduler on the same noise schedule.
        guidance_scale: The guidance scale its source records (:data:`DEFAULT_GUIDANCE` for a folder that records
            none), ``None`` when unknown.
    """

    name: str
    path: str
    pipeline: ClassConditionedPipeline
    guidance_scale: float | None = None

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def params(self) -> int:
        """Parameters of the denoising network."""
        return sum(p.numel() for p in self.unet.parameters())

    def conditioning(self) -> dict[str, Any]:
        """The values of :data:`CONDITIONING_FIELDS`."""
        config = self.unet.config
        return {
            "num_classes": self.pipeline.num_classes,
            "prediction_type": self.pipeline.scheduler.config.get("prediction_type", "epsilon"),
            "sample_size": config.get("sample_size"),
            "in_channels": config.get("in_channels"),
            "out_channels": config.get("out_channels"),
        }


def load_model(path: str | Path, name: str | None = None, device: str | torch.device = "cpu") -> Model:
    """Load a ``.ckpt`` file or a pipeline folder as a :class:`Model` with a DDIM scheduler.

    Args:
        path: A ``.ckpt`` file or a folder with ``model_index.json``.
        name: Label (default: the folder or file name).
        device: Where the network goes.

    Raises:
        ValueError: When ``path`` is neither accepted form or holds no class-conditioned pipeline.
    """
    source = Path(path)
    if not _accepted(source):
        raise ValueError(f"path {str(path)!r} is neither accepted form: give {ACCEPTED_FORMS}.")
    checkpoint = source.is_file()
    pipeline, defaults = load_pipeline_source(
        ckpt=source if checkpoint else None,
        pipeline=None if checkpoint else source,
        expect=ClassConditionedPipeline,
    )
    if is_flow(pipeline.scheduler):
        raise ValueError(
            f"path {str(path)!r} holds a flow-matching model (prediction_type='flow_prediction'); the analysis "
            "compares models on a DDPM noise schedule (DDIM trajectories, add_noise) and does not support it."
        )
    pipeline.scheduler = make_scheduler("ddim", pipeline.scheduler.config)
    guidance = float(defaults["guidance_scale"])
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    pipeline.unet.eval()
    default = source.stem if source.is_file() else source.name
    return Model(name or default, str(path), pipeline, guidance)


def check_conditioning(teacher: Model, students: Sequence[Model]) -> None:
    """Raise one ``ValueError`` listing every conditioning field where a student differs from the teacher."""
    expected = teacher.conditioning()
    problems = []
    for student in students:
        got = student.conditioning()
        for key in CONDITIONING_FIELDS:
            if got[key] != expected[key]:
                problems.append(
                    f"student {student.name!r} ({student.path}): {key}={got[key]!r}, teacher has {expected[key]!r}"
                )
    if problems:
        fields, listing = ", ".join(CONDITIONING_FIELDS), "\n  ".join(problems)
        raise ValueError(f"students must share the teacher's conditioning ({fields}); mismatches:\n  {listing}")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def load_models(
    teacher: str | Path,
    students: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Model, list[Model]]:
    """Load the teacher and the students and check their conditioning matches.

    Args:
        teacher: Path of the teacher (``.ckpt`` or pipeline folder).
        students: Paths of the students.
        labels: Names of the students (default: their folder or file names, made unique).
        device: Where the networks go.
        progress: Show a progress bar.
    """
    if not students:
        raise ValueError("students is empty; give at least one student path.")
    if labels is not None and len(labels) != len(students):
        raise ValueError(f"labels has {len(labels)} names for {len(students)} students; give one per student.")
    paths = [teacher, *students]
    bad = [str(p) for p in paths if not _accepted(Path(p))]
    if bad:
        raise ValueError(f"path(s) {bad} are neither accepted form: give {ACCEPTED_FORMS}.")
    loaded = [load_model(p, device=device) for p in tqdm(paths, desc="loading models", disable=not progress)]
    names = list(labels) if labels is not None else _unique([m.name for m in loaded[1:]])
    if labels is not None and len(set(names)) != len(names):
        raise ValueError(f"labels={names!r} has duplicates; give each student its own name.")
    for model, name in zip(loaded[1:], names):
        model.name = name
    loaded[0].name = "teacher"
    check_conditioning(loaded[0], loaded[1:])
    return loaded[0], loaded[1:]


def _accepted(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / "model_index.json").is_file())


@dataclass
class Session:
    """A teacher, its students and the shared inputs every analysis starts from.

    The inputs come from one CPU generator seeded by ``seed``, in this order: the initial noise
    ``noise`` of the sampling runs, then the noise ``eps`` that :func:`mse_heatmap` adds to ``x_0``
    (both ``(B, C, H, W)``); ``labels`` repeat each class ``n_per_class`` times.

    Args:
        teacher: The reference model.
        students: The models compared with it.
        classes: Classes to sample (default: all of them).
        n_per_class: Samples per class.
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance scale (default: the teacher's, 2.0 when unknown).
        seed: Seed of the generator.
        progress: Show progress bars.
    """

    teacher: Model
    students: list[Model]
    classes: Sequence[int] | None = None
    n_per_class: int = 4
    steps: int = 50
    guidance_scale: float | None = None
    seed: int = 0
    progress: bool = True
    _trajectories: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        num_classes = self.teacher.pipeline.num_classes
        self.classes = list(range(num_classes)) if self.classes is None else [int(c) for c in self.classes]
        bad = [c for c in self.classes if not 0 <= c < num_classes]
        if bad or not self.classes:
            raise ValueError(f"classes={self.classes!r} is not accepted; choose from 0..{num_classes - 1}.")
        for name in ("n_per_class", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not accepted; expected an int >= 1.")
        if self.guidance_scale is None:
            known = self.teacher.guidance_scale
            self.guidance_scale = DEFAULT_GUIDANCE if known is None else known
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be >= 0 (1 disables guidance).")
        self.labels = torch.tensor(self.classes).repeat_interleave(self.n_per_class)
        config = self.teacher.unet.config
        shape = (len(self.labels), config.out_channels, config.sample_size, config.sample_size)
        generator = torch.Generator().manual_seed(self.seed)
        self.noise = torch.randn(shape, generator=generator)
        self.eps = torch.randn(shape, generator=generator)

    @classmethod
    def from_paths(
        cls,
        teacher: str | Path,
        students: Sequence[str | Path],
        labels: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        **options: Any,
    ) -> Session:
        """:func:`load_models`, then a session with ``options`` (see the class arguments)."""
        teacher_model, student_models = load_models(
            teacher, students, labels, device, progress=options.get("progress", True)
        )
        return cls(teacher_model, student_models, **options)

    @property
    def models(self) -> list[Model]:
        """The teacher, then the students."""
        return [self.teacher, *self.students]

    def trajectory(self, model: Model) -> dict[str, Any]:
        """DDIM from the shared noise: ``latents`` and ``x0`` (``(S, B, C, H, W)``, after each step), ``timesteps``."""
        key = id(model)
        if key not in self._trajectories:
            latents: list[torch.Tensor] = []
            x0: list[torch.Tensor] = []
            timesteps: list[int] = []

            def record(pipe: Any, i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict:
                latents.append(tensors["latents"].detach().float().cpu())
                x0.append(tensors["pred_original_sample"].detach().float().cpu())
                timesteps.append(int(t))
                return {}

            pipe = model.pipeline
            pipe(
                self.labels,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                output_type="pt",
                latents=self.noise.to(pipe.device),
                callback_on_step_end=record,
                callback_on_step_end_tensor_inputs=("latents", "pred_original_sample"),
            )
            self._trajectories[key] = {
                "latents": torch.stack(latents),
                "x0": torch.stack(x0),
                "timesteps": timesteps,
            }
        return self._trajectories[key]

    def teacher_samples(self) -> torch.Tensor:
        """The teacher's DDIM samples from the shared noise, in ``[-1, 1]`` (the ``x_0`` of :func:`mse_heatmap`)."""
        return self.trajectory(self.teacher)["latents"][-1].clamp(-1, 1)
