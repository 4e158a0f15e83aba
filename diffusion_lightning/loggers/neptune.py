"""A Lightning logger on the ``neptune`` 1.x client: offline, debug, or a self-hosted server.

Lightning 2.6 removed its ``NeptuneLogger`` when the hosted Neptune service closed, but the client
still works in three useful ways, all of which this logger supports:

- ``mode="offline"``: every operation is appended as one JSON line to
  ``<save_dir>/offline/run__<uuid>__<pid>__<key>/data-1.log`` (with a ``metadata.json`` beside
  it), which ``neptune sync`` can upload to a server later;
- ``mode="debug"``: no data is written; values stay in memory and can be read back with
  ``logger.experiment[path].fetch()`` / ``fetch_values()``, handy in tests and notebooks;
- ``mode="async"`` / ``"sync"``: logging to a self-hosted Neptune server (``project``,
  ``api_token``, or ``NEPTUNE_PROJECT`` / ``NEPTUNE_API_TOKEN``).

Layout of a run (``prefix`` goes before every metric and media path):

==========================  =======================================================================
``config/...``              hyperparameters; nested dicts, dataclasses and namespaces become
                            namespaces (``config/net/block_out_channels``)
``train/loss``              a float series per metric, ``append(value, step=step)``; the metric
                            name's ``/`` separate namespaces
``<key>``                   images (``log_image``): an image series, one entry per image
``<key>/min|max|mean|std``  histograms (``log_histogram``): summary float series ...
``<key>/counts``            ... and a string series of JSON ``{"min", "max", "counts"}`` with
                            ``histogram_bins`` equal-width bins between ``min`` and ``max``
``<key>``                   text (``log_text``): a string series (the client truncates values
                            longer than 1000 characters)
==========================  =======================================================================
"""

from __future__ import annotations

import json
import os
import uuid
from argparse import Namespace
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.imports import RequirementCache
from typing_extensions import override

from diffusion_lightning.loggers.media import to_pil
from diffusion_lightning.utils.compat import add_prefix, convert_params, flatten_dict, sanitize_callable_params

__all__ = ["NeptuneLogger"]

_NEPTUNE_AVAILABLE = RequirementCache("neptune>=1.10")

#: Client modes that can log (``read-only`` cannot).
Mode = Literal["offline", "debug", "async", "sync"]
MODES: tuple[str, ...] = get_args(Mode)
#: Where hyperparameters go in a run.
HPARAMS_NAMESPACE = "config"
#: The client reads its data directory from this variable when a run starts.
_DATA_DIRECTORY_ENV = "NEPTUNE_DATA_DIRECTORY"
_MAX_VERSION_LENGTH = 36  # the client ignores longer custom run ids
_MAX_HISTOGRAM_BINS = 64  # keeps the JSON counts under the client's 1000-character string limit


@contextmanager
def _data_directory(path: str | None) -> Iterator[None]:
    """Point the client at ``path`` while a run starts (it has no argument for it, only a variable)."""
    if path is None:
        yield
        return
    previous = os.environ.get(_DATA_DIRECTORY_ENV)
    os.environ[_DATA_DIRECTORY_ENV] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_DATA_DIRECTORY_ENV, None)
        else:
            os.environ[_DATA_DIRECTORY_ENV] = previous


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


class NeptuneLogger(Logger):
    """Log metrics, hyperparameters, images, histograms and text to a Neptune run.

    The run starts on first use, on rank 0 only (other ranks get a no-op experiment). Its
    ``version`` is the Neptune *custom run id*: given, or a random 12-character id. Against a
    server, a logger given the version of an earlier run continues that run, which is how
    ``diffusion-lightning fit --ckpt_path ...`` resumes curves; offline runs cannot be reopened
    (each one syncs as a run of its own).

    From YAML::

        trainer:
          logger:
            class_path: diffusion_lightning.loggers.NeptuneLogger
            init_args: {project: my-team/diffusion, mode: offline, save_dir: outputs/neptune}

    Args:
        project: ``workspace/project`` on a server; ``None`` reads ``NEPTUNE_PROJECT``. Offline and
            debug runs need none.
        api_token: Server API token; ``None`` reads ``NEPTUNE_API_TOKEN`` (keep it out of configs).
        mode: ``offline``, ``debug``, ``async`` or ``sync``; ``None`` reads ``NEPTUNE_MODE`` and
            falls back to ``offline``.
        name: Run name (``sys/name``); also the experiment name Lightning uses in checkpoint paths
            (default ``neptune``).
        version: Custom run id (at most 36 characters); ``None`` draws a new one.
        tags: Run tags (``sys/tags``).
        description: Run description (``sys/description``).
        prefix: Namespace put before every metric, image, histogram and text path (not before
            ``config/``), e.g. ``training``.
        save_dir: Directory of the client's local data (offline runs, async queues); ``None``
            reads ``NEPTUNE_DATA_DIRECTORY`` and falls back to ``.neptune`` in the working directory.
        source_files: Glob patterns of source files to upload with the run; ``None`` uploads none.
        capture_system: Capture stdout, stderr, hardware metrics, tracebacks and git information
            (the client's own defaults); off keeps runs small and the logger quiet.
        histogram_bins: Number of equal-width bins ``log_histogram`` stores, 1 to 64.
    """

    def __init__(
        self,
        project: str | None = None,
        api_token: str | None = None,
        mode: Mode | None = None,
        name: str | None = None,
        version: str | None = None,
        tags: list[str] | None = None,
        description: str | None = None,
        prefix: str = "",
        save_dir: str | None = None,
        source_files: list[str] | None = None,
        capture_system: bool = False,
        histogram_bins: int = 64,
    ) -> None:
        if not _NEPTUNE_AVAILABLE:
            raise ModuleNotFoundError(
                "NeptuneLogger needs the `neptune` client (>=1.10): pip install 'diffusion-lightning[neptune]'"
            )
        super().__init__()
        resolved = mode if mode is not None else os.environ.get("NEPTUNE_MODE", "offline")
        if resolved not in MODES:
            raise ValueError(f"mode={resolved!r} (or NEPTUNE_MODE) is not supported; expected one of {MODES}.")
        if version is not None and not 0 < len(version) <= _MAX_VERSION_LENGTH:
            raise ValueError(f"version={version!r} must have 1 to {_MAX_VERSION_LENGTH} characters.")
        if not 1 <= histogram_bins <= _MAX_HISTOGRAM_BINS:
            raise ValueError(f"histogram_bins={histogram_bins!r} must be in [1, {_MAX_HISTOGRAM_BINS}].")
        self._project = project
        self._api_token = api_token
        self._mode = cast(Mode, resolved)
        self._name = name
        self._version = version if version is not None else uuid.uuid4().hex[:12]
        self._tags = list(tags) if tags else None
        self._description = description
        self._prefix = prefix.strip("/")
        self._save_dir = save_dir
        self._source_files = list(source_files) if source_files else []
        self._capture_system = capture_system
        self._histogram_bins = histogram_bins
        self._run: Any = None

    # ------------------------------------------------------------------ identity

    @property
    @override
    def name(self) -> str:
        return self._name or "neptune"

    @property
    @override
    def version(self) -> str:
        return self._version

    @property
    def mode(self) -> str:
        """The client mode the run uses."""
        return self._mode

    @property
    @override
    def save_dir(self) -> str:
        """The client's local data directory (offline runs live under ``<save_dir>/offline``)."""
        return os.path.abspath(self._save_dir or os.environ.get(_DATA_DIRECTORY_ENV, ".neptune"))

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``neptune.Run``, started on first access (a no-op object on ranks other than 0)."""
        if self._run is None:
            import neptune

            capture = self._capture_system
            with _data_directory(self._save_dir):
                self._run = neptune.init_run(
                    project=self._project,
                    api_token=self._api_token,
                    mode=self._mode,
                    name=self._name,
                    custom_run_id=self._version,
                    tags=self._tags,
                    description=self._description,
                    source_files=self._source_files,
                    capture_stdout=capture,
                    capture_stderr=capture,
                    capture_hardware_metrics=capture,
                    capture_traceback=capture,
                    git_ref=None if capture else False,
                )
        return self._run

    def _path(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    # ------------------------------------------------------------------ Lightning's interface

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Store ``params`` under ``config/``, nested dicts and namespaces as nested namespaces."""
        from neptune.utils import stringify_unsupported

        params = sanitize_callable_params(convert_params(params))
        for key, value in flatten_dict(params).items():
            self.experiment[f"{HPARAMS_NAMESPACE}/{key}"] = stringify_unsupported(_scalar(value))

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Append each metric to the float series of its name (``train/loss`` -> ``run["train/loss"]``)."""
        for key, value in add_prefix(metrics, self._prefix, "/").items():
            self.experiment[key].append(float(_scalar(value)), step=step)

    @override
    @rank_zero_only
    def save(self) -> None:
        """Flush queued operations to disk (no network wait)."""
        if self._run is not None:
            self._run.wait(disk_only=True)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Mark the run failed or not (``sys/failed``) and stop it; later logging starts a new one."""
        if self._run is None:
            return
        self._run["sys/failed"] = status == "failed"
        self._run.stop()
        self._run = None

    # ------------------------------------------------------------------ media (duck-typed by loggers.media)

    @rank_zero_only
    def log_image(
        self, key: str, images: Sequence[Any], step: int | None = None, caption: Sequence[str] | None = None
    ) -> None:
        """Append images to the image series ``key``, like ``WandbLogger.log_image``.

        Args:
            key: Series path.
            images: PIL images, ``(C, H, W)`` tensors in ``[0, 1]`` or ``(H, W[, C])`` arrays.
            step: Step of every image of this call.
            caption: One caption per image (the entry's name).
        """
        if caption is not None and len(caption) != len(images):
            raise ValueError(f"caption has {len(caption)} entries for {len(images)} images; expected one per image.")
        from neptune.types import File

        series = self.experiment[self._path(key)]
        for index, image in enumerate(images):
            name = caption[index] if caption is not None else None
            series.append(File.as_image(to_pil(image)), step=step, name=name)

    @rank_zero_only
    def log_histogram(self, key: str, values: torch.Tensor | np.ndarray, step: int | None = None) -> None:
        """Log the distribution of ``values``.

        Neptune 1.x has no histogram type, so this stores float series ``<key>/min``, ``max``,
        ``mean`` and ``std`` (chartable over steps) and the string series ``<key>/counts`` whose
        entries are JSON ``{"min": a, "max": b, "counts": [...]}``: ``histogram_bins``
        equal-width bins between ``a`` and ``b``. Non-finite values are left out.
        """
        flat = torch.as_tensor(values).detach().double().flatten().cpu().numpy()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        low, high = float(flat.min()), float(flat.max())
        counts, _ = np.histogram(flat, bins=self._histogram_bins, range=(low, high))
        run, path = self.experiment, self._path(key)
        stats = {"min": low, "max": high, "mean": float(flat.mean()), "std": float(flat.std())}
        for name, value in stats.items():
            run[f"{path}/{name}"].append(value, step=step)
        payload = {"min": low, "max": high, "counts": counts.tolist()}
        run[f"{path}/counts"].append(json.dumps(payload, separators=(",", ":")), step=step)

    @rank_zero_only
    def log_text(self, key: str, text: str, step: int | None = None) -> None:
        """Append ``text`` to the string series ``key``."""
        self.experiment[self._path(key)].append(text, step=step)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run"] = None  # a live run does not pickle; it restarts where it is next used
        return state
