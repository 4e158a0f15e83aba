"""Pure functions for diffusion training objectives.

Targets for the prediction types, min-SNR-gamma weights, flow matching's noise levels and the
per-sample losses. Nothing here holds state: every function takes tensors (and a diffusers
scheduler where the noise schedule is needed) and returns tensors, so research code can reuse them
outside the LightningModules.

Flow matching (``flow_prediction``, rectified flow as in SD3 and Flux) noises along a straight line,
``x_t = (1 - sigma) x_0 + sigma * noise`` with ``sigma`` in ``[0, 1]``, and the network predicts the
velocity ``noise - x_0``; its timestep is ``sigma * num_train_timesteps``, as diffusers'
``FlowMatchEulerDiscreteScheduler`` feeds it.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow_prediction"]
LossType = Literal["l2", "l1", "huber"]
#: Flow matching's timestep densities (``logit_normal``, ``mode``) and loss weightings (``sigma_sqrt``,
#: ``cosmap``), as diffusers' SD3 and Flux scripts name them; ``none`` samples uniformly, unweighted.
WeightingScheme = Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]

PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
WEIGHTING_SCHEMES: tuple[str, ...] = get_args(WeightingScheme)
FLOW = "flow_prediction"


def check_choice(field: str, value: object, accepted: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming ``field`` when ``value`` is not one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{field}={value!r} is not supported; expected one of {list(accepted)}.")


def _expand(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def training_target(
    scheduler,
    sample: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The regression target of the network for ``prediction_type``.

    Args:
        scheduler: A diffusers scheduler with ``alphas_cumprod`` (``DDPMScheduler`` and friends).
        sample: The clean sample ``x_0``.
        noise: The Gaussian noise mixed into ``x_0``.
        timesteps: Integer timesteps, one per sample.
        prediction_type: ``epsilon`` (the noise), ``v_prediction`` (``alpha_t * eps - sigma_t * x_0``,
            Salimans & Ho 2022), ``sample`` (``x_0`` itself) or ``flow_prediction`` (the velocity
            ``noise - x_0``; ``scheduler`` and ``timesteps`` are not needed).
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == FLOW:
        return noise - sample
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    return sample


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift of flow noise levels, ``shift * s / (1 + (shift - 1) * s)`` (SD3's, diffusers' ``shift``).

    ``shift > 1`` moves training and sampling towards high noise, which larger images need.
    """
    if shift <= 0:
        raise ValueError(f"flow_shift={shift!r} must be > 0 (1 leaves the noise levels as they are).")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(
    batch_size: int,
    weighting_scheme: str,
    generator: torch.Generator | None = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    stratified: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Flow-matching noise levels ``sigma`` in ``[1/T, 1]`` drawn from ``weighting_scheme``'s density.

    Draws with diffusers' ``compute_density_for_timestep_sampling``. ``stratified`` puts one draw in
    each of ``batch_size`` equal-probability slices of the density instead (the same levels every
    call for a given generator state): diffusers has no stratified draw, and a validation loss needs one.
    """
    check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if stratified:
        offsets = torch.rand(batch_size, generator=generator, device=device)
        u = (torch.arange(batch_size, device=device) + offsets) / batch_size
        if weighting_scheme == "logit_normal":
            u = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)))
        elif weighting_scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = compute_density_for_timestep_sampling(
            weighting_scheme, batch_size, logit_mean, logit_std, mode_scale, device=device, generator=generator
        )
    # sigma_sqrt weighs 1/sigma^2: the floor keeps it finite, at the scheduler's last level
    return shift_sigmas(u.clamp(0.0, 1.0), shift).clamp(min=1.0 / num_train_timesteps, max=1.0)


def flow_noise(sample: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x_0 + sigma * noise``, one ``sigma`` per sample."""
    s = _expand(sigmas.to(sample.dtype), sample.ndim)
    return (1.0 - s) * sample + s * noise


def flow_loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights of ``weighting_scheme`` (diffusers' ``compute_loss_weighting_for_sd3``), or ``None``."""
    check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if weighting_scheme not in ("sigma_sqrt", "cosmap"):
        return None
    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas).float()


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2`` (``diffusers.training_utils.compute_snr``)."""
    return compute_snr(scheduler, timesteps)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the given prediction type.

    The paper weights the ``x_0`` error by ``min(SNR, gamma)``. Since
    ``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2``,
    the same weighting expressed on the network's own target is ``min(SNR, gamma) / SNR`` for
    epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction and ``min(SNR, gamma)`` for sample
    prediction. This matches the diffusers training scripts for epsilon and v-prediction.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == FLOW:
        raise ValueError(
            "snr_gamma applies to DDPM noise schedules; flow_prediction weighs its loss by weighting_scheme."
        )
    if gamma <= 0:
        raise ValueError(f"snr_gamma={gamma!r} must be > 0 (or None to disable min-SNR weighting).")
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        # A zero-terminal-SNR schedule has SNR == 0 at its last step: weight it like the limit (1).
        return torch.where(snr_values > 0, clipped / snr_values.clamp(min=1e-20), torch.ones_like(snr_values))
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float = 0.1
) -> torch.Tensor:
    """Per-element loss, unreduced.

    ``huber`` is the pseudo-Huber loss ``2c (sqrt((x - y)^2 + c^2) - c)`` used by the diffusers
    scheduled-Huber scripts: equal to l2 near zero and ``2c |x - y|`` in the tails, smooth everywhere,
    so outliers pull less than under l2.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    prediction = prediction.float()
    target = target.float()
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if huber_c <= 0:
        raise ValueError(f"huber_c={huber_c!r} must be > 0.")
    return 2.0 * huber_c * (torch.sqrt((prediction - target) ** 2 + huber_c**2) - huber_c)


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    loss_type: str = "l2",
    weights: torch.Tensor | None = None,
    huber_c: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and the per-sample losses (before weighting), for logging per timestep.

    Args:
        prediction: The network's output.
        target: The matching target from :func:`training_target`.
        loss_type: ``l2``, ``l1`` or ``huber``.
        weights: Optional per-sample weights (for example :func:`min_snr_weights`).
        huber_c: The pseudo-Huber transition point.

    Returns:
        ``(loss, per_sample)`` where ``loss`` is the weighted mean over the batch.
    """
    per_element = elementwise_loss(prediction, target, loss_type, huber_c)
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    if weights is None:
        return per_sample.mean(), per_sample
    if weights.shape != per_sample.shape:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}, expected {tuple(per_sample.shape)} (one per sample)."
        )
    return (per_sample * weights.to(per_sample.dtype)).mean(), per_sample


def predicted_original(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """``x_0`` implied by a network output at ``(sample, timesteps)`` for the prediction type."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == FLOW:
        sigmas = timesteps.float().to(sample.device) / float(scheduler.config.num_train_timesteps)
        return sample.float() - _expand(sigmas, sample.ndim) * model_output.float()
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    a = _expand(alphas_cumprod[timesteps].sqrt(), sample.ndim)
    s = _expand((1.0 - alphas_cumprod[timesteps]).sqrt(), sample.ndim)
    out = model_output.float()
    x = sample.float()
    if prediction_type == "epsilon":
        return (x - s * out) / a
    if prediction_type == "v_prediction":
        return a * x - s * out
    return out
