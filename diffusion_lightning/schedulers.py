"""Noise schedulers by name, all from diffusers.

Training uses ``DDPMScheduler`` (its ``add_noise``/``get_velocity`` define the forward process),
or ``FlowMatchEulerDiscreteScheduler`` for flow matching (its ``shift`` is the resolution shift).
Sampling can swap in any scheduler that shares the same noise schedule and prediction type: for a
DDPM schedule one built with ``from_config`` so the betas travel with it; for a flow schedule
diffusers' flow schedulers (Euler, Heun) or its multistep solvers in their flow mode
(``use_flow_sigmas``, ``prediction_type="flow_prediction"``), with the same shift.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion_lightning.losses import FLOW, PREDICTION_TYPES, check_choice

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")

#: Sampling schedulers by the short names the CLI and configs accept.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
#: The samplers of a flow-matching schedule: ``(class, extra config)``; the shift is added.
FLOW_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, {}),
    "heun": (FlowMatchHeunDiscreteScheduler, {}),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
}
_FLOW_CLASSES = (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)


def training_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
    flow_shift: float = 1.0,
) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The scheduler that defines the forward (noising) process, with validated arguments.

    ``FlowMatchEulerDiscreteScheduler`` (with ``shift=flow_shift``) for ``flow_prediction``, where the
    beta arguments do not apply; else ``DDPMScheduler``.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be >= 2.")
    if flow_shift <= 0:
        raise ValueError(f"flow_shift={flow_shift!r} must be > 0 (1 leaves the noise levels as they are).")
    if prediction_type == FLOW:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    if flow_shift != 1.0:
        raise ValueError(f"flow_shift={flow_shift!r} applies to prediction_type='flow_prediction' only.")
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
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


def is_flow(scheduler: Any) -> bool:
    """Whether a scheduler (or its config) samples a flow-matching model."""
    if isinstance(scheduler, _FLOW_CLASSES):
        return True
    config = scheduler.config if isinstance(scheduler, SchedulerMixin) else scheduler
    config = dict(config or {})
    return (
        config.get("_class_name") in {cls.__name__ for cls in _FLOW_CLASSES}
        or config.get("prediction_type") == FLOW
        or bool(config.get("use_flow_sigmas"))
        or {"shift", "use_dynamic_shifting"} <= config.keys()  # a FlowMatch* config without its class name
    )


def flow_shift_of(config: Any) -> float:
    """The resolution shift of a flow scheduler's config (``shift``, or a multistep solver's ``flow_shift``)."""
    config = dict(config)
    return float(config.get("shift", config.get("flow_shift", 1.0)))


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A sampling scheduler named ``name`` with the noise schedule of ``config``.

    Args:
        name: One of :data:`SCHEDULERS` (``ddpm``, ``ddim``, ``dpm`` = DPM-Solver++ 2M, ``euler``,
            ``euler_a``, ``heun``, ``unipc``); for a flow-matching ``config`` one of
            :data:`FLOW_SCHEDULERS` (``euler``, ``heun``, ``dpm``, ``unipc``).
        config: A scheduler or its ``config`` (betas or flow shift, timesteps, prediction type are kept).
    """
    check_choice("scheduler", name, tuple(SCHEDULERS))
    flow = is_flow(config)
    if isinstance(config, SchedulerMixin):
        config = config.config
    if flow:
        if name not in FLOW_SCHEDULERS:
            raise ValueError(
                f"scheduler={name!r} does not sample flow-matching models; expected one of {list(FLOW_SCHEDULERS)}."
            )
        cls, overrides = FLOW_SCHEDULERS[name]
        shift = flow_shift_of(config)
        steps = int(dict(config).get("num_train_timesteps", 1000))
        if cls in _FLOW_CLASSES:
            return cls(num_train_timesteps=steps, shift=shift, **overrides)
        # the multistep solvers' flow mode: sigmas, shift and the x_0 = x_t - sigma * v conversion
        return cls(num_train_timesteps=steps, use_flow_sigmas=True, flow_shift=shift, prediction_type=FLOW, **overrides)
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name of a scheduler instance (its class name when it is not one of ours)."""
    for name, (cls, _) in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__
