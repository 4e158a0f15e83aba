"""How many samples a batch holds, for throughput counters (Lightning's ThroughputMonitor, PrometheusMonitor)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: The keys a batch of this package's data modules is counted by, first found first.
BATCH_KEYS = ("images", "latents", "pixel_values", "input_ids", "labels", "captions", "prompts", "keys")


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``.

    A dictionary (what every data module of this package yields: ``images`` with ``labels``, or with
    ``captions``) is counted by its first key of :data:`BATCH_KEYS` (a tensor's first dimension, a list's
    length), else by its first tensor; a tensor by its first dimension; a tuple or list of tensors by its
    first item. Usable from YAML wherever a callable is asked for, e.g. Lightning's ``ThroughputMonitor``::

        - class_path: lightning.pytorch.callbacks.ThroughputMonitor
          init_args:
            batch_size_fn: diffusion_lightning.callbacks.batch_size

    Raises:
        TypeError: ``batch`` holds nothing to count.
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        for key in BATCH_KEYS:
            if key in batch:
                return _count(batch[key], key)
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim:
                return int(value.shape[0])
        raise TypeError(f"cannot count the samples of a batch with keys {sorted(map(str, batch))}")
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        return batch_size(batch[0]) if isinstance(batch[0], (torch.Tensor, Mapping)) else len(batch)
    raise TypeError(f"cannot count the samples of a batch of type {type(batch).__name__}")


def _count(value: Any, key: str) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim else 1
    if isinstance(value, Sequence) and not isinstance(value, str):
        return len(value)
    raise TypeError(f"cannot count the samples of a batch by its {key!r} of type {type(value).__name__}")
