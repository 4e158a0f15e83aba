"""A disk cache of VAE posteriors, so a latent model encodes each training image once.

Each entry is the posterior's ``(mean, logvar)`` of one image (not a sample of it): the training
step still draws a fresh latent from it with its own seeded generator, exactly as if the VAE had
run. Entries live under ``<root>/<vae id>/<H>x<W>/<sha1 of the image key>.pt``, so another VAE or
another resolution never reads a stale entry, and each file appears in one rename. Missing
entries are encoded with their whole batch (see :meth:`LatentCache.get`), so a run that finds
some of a batch's entries written by a killed run gets the bits of the run that was not killed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["LatentCache", "save_entry"]


def save_entry(value: object, path: Path) -> None:
    """``torch.save`` to ``path`` in one rename: a reader (or a run killed mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


class LatentCache:
    """Posterior parameters by image key, computed with ``encode`` on a miss.

    Args:
        root: Folder of the cache.
        vae_id: Names the VAE's weights (a hash), part of every entry's path.
    """

    def __init__(self, root: str | os.PathLike[str], vae_id: str) -> None:
        self.root = Path(root)
        self.vae_id = vae_id

    def paths(self, keys: list[str], height: int, width: int) -> list[Path]:
        folder = self.root / self.vae_id / f"{height}x{width}"
        return [folder / f"{hashlib.sha1(key.encode()).hexdigest()}.pt" for key in keys]

    def get(
        self, images: torch.Tensor, keys: list[str], encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``(B, 2C, h, w)`` posterior parameters of ``images``: the cached ones read, the missing ones encoded.

        The missing ones are encoded with their whole batch, not alone: the VAE's numbers depend on
        the batch they are computed in (a batch of one takes other kernels), and an entry's value
        must depend only on the batch it was first met in. A run resumed after a kill that had
        written some of a batch's entries (they are written one by one) then computes the rest
        exactly as the run that was not interrupted did.
        """
        if len(keys) != images.shape[0]:
            raise ValueError(f"keys has {len(keys)} entries for {images.shape[0]} images.")
        paths = self.paths(keys, images.shape[-2], images.shape[-1])
        missing = {i for i, path in enumerate(paths) if not path.is_file()}
        fresh = encode(images).detach().cpu() if missing else None
        parameters = []
        for i, path in enumerate(paths):
            if i in missing:
                assert fresh is not None
                value = fresh[i].clone()
                save_entry(value, path)
            else:
                value = torch.load(path, map_location="cpu", weights_only=True)
            parameters.append(value)
        return torch.stack(parameters)
