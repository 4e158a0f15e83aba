"""Noise schedulers by name, all from diffusers.

Training always uses ``DDPMScheduler`` (its ``add_noise``/``get_velocity`` define the forward
process); sampling can swap in any scheduler that shares the same betas and prediction type, built
with ``from_config`` so the noise schedule travels with it.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion_lightning.losses import PREDICTION_TYPES, check_choice

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")

#: Sampling schedulers by the short names the CLI and configs accept.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def training_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
) -> DDPMScheduler:
    """The ``DDPMScheduler`` that defines the forward (noising) process, with validated arguments."""
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be >= 2.")
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"beta_start={beta_start!r}, beta_end={beta_end!r}: need 0 < beta_start < beta_end < 1.")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        clip_sample=False,
    )


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A sampling scheduler named ``name`` with the noise schedule of ``config``.

    Args:
        name: One of :data:`SCHEDULERS` (``ddpm``, ``ddim``, ``dpm`` = DPM-Solver++ 2M, ``euler``,
            ``euler_a``, ``unipc``).
        config: A scheduler or its ``config`` (betas, timesteps, prediction type are kept).
    """
    check_choice("scheduler", name, tuple(SCHEDULERS))
    if isinstance(config, SchedulerMixin):
        config = config.config
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name of a scheduler instance (its class name when it is not one of ours)."""
    for name, (cls, _) in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__
