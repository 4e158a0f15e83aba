"""The statistics that :class:`~diffusion_lightning.callbacks.watcher.GradientActivationWatcher` logs."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["STATISTICS", "first_tensor", "statistics"]

STATISTICS = ("hist", "mean", "std", "norm", "min", "max", "var", "abs_mean")
"""Statistics that can be logged; ``hist`` is a histogram, the others are scalars."""

_REDUCTIONS = {
    "mean": torch.mean,
    "std": lambda x: torch.std(x, correction=0),
    "var": lambda x: torch.var(x, correction=0),
    "norm": torch.linalg.vector_norm,
    "min": torch.min,
    "max": torch.max,
    "abs_mean": lambda x: x.abs().mean(),
}


def statistics(values: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """The named scalar statistics of all entries of ``values`` as one float32 vector (population std/var)."""
    x = values.detach().reshape(-1).float()
    if not names:
        return x.new_empty(0)
    return torch.stack([_REDUCTIONS[name](x) for name in names])


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first floating-point tensor of a module output (a tensor, a tuple, or a diffusers ``BaseOutput``)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() and output.numel() > 0 else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    for value in values:
        tensor = first_tensor(value)
        if tensor is not None:
            return tensor
    return None
