"""Deterministic seeds derived from several integers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_lightning.utils.compat import rng_states, set_rng_states

#: Odd 64-bit mixing constants of splitmix64.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK = 0xFFFFFFFFFFFFFFFF


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 over each value, order matters)."""
    state = 0
    for value in values:
        state = (state + _MIX[0] + (int(value) & _MASK)) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * _MIX[1]) & _MASK
        z = ((z ^ (z >> 27)) * _MIX[2]) & _MASK
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) in a form ``weights_only`` loads.

    Lightning's collection (``compat.rng_states``) keeps numpy's state as an ndarray, which
    ``torch.load(weights_only=True)`` refuses; the key array is stored as a tensor instead.
    """
    states = rng_states(include_cuda=torch.cuda.is_available())
    name, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNG states saved by :func:`collect_rng_states`."""
    states = dict(states)
    if not torch.cuda.is_available() or not states.get("torch.cuda"):
        states.pop("torch.cuda", None)
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached)
    set_rng_states(states)
