"""Real-image features, computed once per dataset, split, extractor and image size, and cached on disk.

FID, KID, precision/recall and realism compare generated samples with real ones in a feature
space; the real side never changes between evaluations, so its features are written to
``<cache_dir>/<key>.safetensors`` the first time and read back afterwards. The key names the
dataset (its class and every option that changes which images it serves), the split, the
extractor (whose name carries a fingerprint of its weights) and the image size, so a change to
any of them computes a new entry instead of reusing a stale one.

Batches may carry class ``labels`` (labelled image sets) or not (image-caption sets, whose
``captions`` the reference ignores); samples a data set could not read (anything but a dict) are
left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from diffusion_lightning.metrics.features import FeatureExtractor
from diffusion_lightning.metrics.manifold import kth_neighbour_radii
from diffusion_lightning.utils.io import atomic_file

__all__ = ["RealReference", "dataset_key", "default_cache_dir", "real_reference"]

log = logging.getLogger(__name__)

#: Data-module attributes that change how images are batched or loaded, not which images are served.
_LOADER_OPTIONS = {
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "drop_last",
    "predict_samples_per_class",
    "predict_samples_per_prompt",
    "predict_prompts_file",
}


def default_cache_dir() -> Path:
    """``$DIFFUSION_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/diffusion_lightning`` (``~/.cache/...``)."""
    if os.environ.get("DIFFUSION_LIGHTNING_CACHE"):
        return Path(os.environ["DIFFUSION_LIGHTNING_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "diffusion_lightning"


def dataset_key(datamodule: Any) -> str:
    """``<class>[-<source>]-<hash of the options that select images>``, e.g. ``mnistdatamodule-embedded-1a2b3c4d``."""
    options: dict[str, Any] = {
        name: value
        for name, value in sorted(vars(datamodule).items())
        if not name.startswith("_") and name not in _LOADER_OPTIONS and isinstance(value, (str, int, float, bool))
    }
    options["pad_to"] = datamodule.pad_to() if callable(getattr(datamodule, "pad_to", None)) else None
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    source = f"-{options['source']}" if isinstance(options.get("source"), str) else ""
    return f"{type(datamodule).__name__.lower()}{source}-{digest}"


@dataclass
class RealReference:
    """Features (and logits, labels) of one split of real images in one extractor's space."""

    key: str
    features: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None
    _radii: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def radii(self, k: int) -> torch.Tensor:
        """k-th nearest-neighbour radii of the real features (computed once per ``k``)."""
        if k not in self._radii:
            self._radii[k] = kth_neighbour_radii(self.features, k)
        return self._radii[k]


def _images(datamodule: Any, split: str) -> Any:
    datamodule.setup("fit" if split in ("train", "val") else split)
    datasets = getattr(datamodule, "datasets", None)
    if not datasets or split not in datasets:
        available = sorted(datasets) if datasets else []
        raise ValueError(f"split={split!r} is not served by {type(datamodule).__name__}; available: {available}.")
    return datasets[split]


def compute_features(
    extractor: FeatureExtractor, loader: Any, description: str = "features", progress: bool = True
) -> dict[str, torch.Tensor]:
    """Run ``extractor`` over batches of ``{"images" in [-1, 1][, "labels"]}``; concatenated outputs.

    ``labels`` are the batches' class labels, ``-1`` for batches without (image-caption sets).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        if batch is None:
            continue
        images = batch["images"]
        out = extractor.encode((images / 2 + 0.5).clamp(0, 1))
        labels = batch.get("labels")
        out["labels"] = labels.long() if labels is not None else torch.full((images.shape[0],), -1, dtype=torch.long)
        for name, value in out.items():
            parts.setdefault(name, []).append(value)
    if not parts:
        raise ValueError(f"{description}: no image of the data set could be read.")
    return {name: torch.cat(values) for name, values in parts.items()}


def _readable(samples: list[Any]) -> dict[str, Any] | None:
    """Collate the samples a data set could read (dicts); ``None`` when it could read none of the batch."""
    good = [sample for sample in samples if isinstance(sample, dict)]
    return default_collate(good) if good else None


def real_reference(
    datamodule: Any,
    extractor: FeatureExtractor,
    split: str = "train",
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 500,
    progress: bool = True,
) -> RealReference:
    """The real features of ``split``, from the cache or computed (and cached) now.

    Args:
        datamodule: Anything serving samples ``{"images" in [-1, 1], ...}`` under ``datasets[split]``
            after ``setup()``: a :class:`~diffusion_lightning.data.base.LabelledImageDataModule`, an
            ``ImageCaptionDataModule`` or a :class:`~diffusion_lightning.metrics.folders.FolderReference`.
        extractor: The feature space.
        split: ``train``, ``val`` or ``test``.
        cache_dir: Folder of the cache (default :func:`default_cache_dir`); ``None`` uses the default.
        batch_size: Images per extractor call.
        progress: Show a progress bar while computing.
    """
    dataset = _images(datamodule, split)
    size = getattr(datamodule, "image_size", None) or tuple(dataset[0]["images"].shape[-2:])
    key = f"{dataset_key(datamodule)}-{split}-{extractor.name}-{size}"
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "reference" / f"{key}.safetensors"
    if path.is_file():
        tensors = load(path.read_bytes())
        cached = int(tensors["dataset_size"]) if "dataset_size" in tensors else tensors["labels"].shape[0]
        if cached == len(dataset):
            return RealReference(key, tensors["features"], tensors["labels"], tensors.get("logits"))
        log.warning(
            "Cached real features %s are of %d images, the split has %d; recomputing.",
            path,
            cached,
            len(dataset),
        )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_readable)
    tensors = compute_features(extractor, loader, description=f"real {split} features", progress=progress)
    tensors["dataset_size"] = torch.tensor(len(dataset))
    with atomic_file(path, "wb") as handle:
        handle.write(save({name: value.contiguous() for name, value in tensors.items()}, metadata={"key": key}))
    log.info("Cached real features of %d images at %s.", tensors["labels"].shape[0], path)
    return RealReference(key, tensors["features"], tensors["labels"], tensors.get("logits"))
