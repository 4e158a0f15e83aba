"""A disk cache of prompt embeddings, so a run with frozen text encoders encodes each caption once.

Written here because the libraries have no reusable piece for it: diffusers' training scripts
compute the embeddings of one run into memory inside the script (``compute_text_embeddings`` in
``train_dreambooth_lora_sdxl.py``), and the trainers that cache them on disk do it inside their own
training loops.

An entry holds what a model's ``encode_prompt`` returns for one prompt: its ``prompt_embeds``
and, for models that have them, its ``pooled_prompt_embeds``. It is keyed by the prompt's token
ids (every tokenizer's, side by side), not by its text: the ids are what the encoders see, so the
empty prompt of prompt dropout and batches that arrive already tokenized hit the same entries as
captions. Entries live under ``<root>/<encoder id>/<sha1 of the ids>.pt``, where the encoder id
names the text encoders' weights and the model class (which fixes the layers read), so other
encoders never read a stale entry; each file appears in one rename.

Like :class:`~diffusion_lightning.utils.latent_cache.LatentCache`, the missing entries of a batch
are encoded with their whole batch, and :meth:`TextEmbeddingCache.fill` encodes in fixed chunks of
the sorted unique prompts: a run resumed after a kill that had written part of a chunk computes
the rest with the bits of the run that was not interrupted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from diffusion_lightning.utils.latent_cache import save_entry

__all__ = ["TextEmbeddingCache", "Embeddings"]

#: ``(prompt_embeds, pooled_prompt_embeds or None)``, as the latent modules' ``encode_prompt`` returns them.
Embeddings = tuple[torch.Tensor, "torch.Tensor | None"]


class TextEmbeddingCache:
    """Prompt embeddings by token ids, computed with ``encode`` on a miss.

    Args:
        root: Folder of the cache.
        encoder_id: Names the text encoders (their weights' hash and the encoding), part of every entry's path.
    """

    def __init__(self, root: str | os.PathLike[str], encoder_id: str) -> None:
        self.root = Path(root)
        self.encoder_id = encoder_id

    @property
    def folder(self) -> Path:
        return self.root / self.encoder_id

    def paths(self, input_ids: torch.Tensor) -> list[Path]:
        """The entry of each row of ``input_ids`` ``(B, L)``."""
        rows = input_ids.detach().to("cpu", torch.int64).contiguous()
        return [self.folder / f"{hashlib.sha1(row.numpy().tobytes()).hexdigest()}.pt" for row in rows]

    def get(self, input_ids: torch.Tensor, encode: Callable[[torch.Tensor], Embeddings]) -> Embeddings:
        """The embeddings of every row of ``input_ids``: the cached ones read, the missing ones encoded.

        When any row is missing, ``encode`` runs on the whole batch (an entry's value then depends
        only on the batch it was first met in) and the missing rows are written.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, tokens).")
        paths = self.paths(input_ids)
        missing = {i for i, path in enumerate(paths) if not path.is_file()}
        fresh_hidden = fresh_pooled = None
        if missing:
            with torch.no_grad():
                fresh_hidden, fresh_pooled = encode(input_ids)
            fresh_hidden = fresh_hidden.detach().cpu()
            fresh_pooled = None if fresh_pooled is None else fresh_pooled.detach().cpu()
        hidden, pooled = [], []
        for i, path in enumerate(paths):
            if i in missing:
                assert fresh_hidden is not None
                entry = {
                    "hidden": fresh_hidden[i].clone(),
                    "pooled": None if fresh_pooled is None else fresh_pooled[i].clone(),
                }
                save_entry(entry, path)
            else:
                entry = torch.load(path, map_location="cpu", weights_only=True)
            hidden.append(entry["hidden"])
            pooled.append(entry["pooled"])
        present = [p for p in pooled if p is not None]
        if present and len(present) != len(pooled):
            raise ValueError(f"{self.folder} mixes entries with and without pooled embeddings; delete the folder.")
        return torch.stack(hidden), torch.stack(present) if present else None

    def fill(
        self,
        prompts: Iterable[str],
        tokenize: Callable[[list[str]], torch.Tensor],
        encode: Callable[[torch.Tensor], Embeddings],
        batch_size: int = 32,
        progress: bool = True,
    ) -> int:
        """Encode every prompt that has no entry yet; returns how many chunks were encoded.

        The unique prompts are sorted and encoded ``batch_size`` at a time, so the chunks (and the
        entries' bits) are the same in every run over the same prompts.
        """
        from tqdm.auto import tqdm

        unique = sorted(set(prompts))
        chunks = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
        encoded = 0
        for chunk in tqdm(chunks, desc="caching text embeddings", disable=not progress, leave=False):
            ids = tokenize(chunk)
            if all(path.is_file() for path in self.paths(ids)):
                continue
            self.get(ids, encode)
            encoded += 1
        return encoded
