"""The text-embedding cache of the latent modules (``text_embedding_cache_dir``).

A mixin of :class:`~diffusion_lightning.modules.latent.LatentDiffusionModule`: it reads prompt
embeddings from a :class:`~diffusion_lightning.utils.text_cache.TextEmbeddingCache` instead of
running the frozen text encoders, and fills the cache at the start of fitting. The host provides
``text_embedding_cache_dir``, ``text_encoders``, ``tokenize``, ``encode_prompt`` and the Lightning
module's ``device`` and ``trainer``.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusion_lightning.utils.text_cache import Embeddings, TextEmbeddingCache

__all__ = ["TextEmbeddingCaching"]


class TextEmbeddingCaching:
    """Prompt embeddings from the text-embedding cache when ``text_embedding_cache_dir`` is set."""

    text_embedding_cache_dir: str | None
    _text_cache: TextEmbeddingCache | None = None
    text_encoders: list[Any]
    device: torch.device
    trainer: Any
    _trainer: Any
    tokenize: Any
    encode_prompt: Any

    @property
    def text_cache(self) -> TextEmbeddingCache | None:
        """The text-embedding cache (``text_embedding_cache_dir``), ``None`` when off."""
        if not self.text_embedding_cache_dir:
            return None
        if self._text_cache is None:
            from diffusion_lightning.metrics.features import state_fingerprint

            prints = "-".join(state_fingerprint(encoder, 8) for encoder in self.text_encoders)
            self._text_cache = TextEmbeddingCache(self.text_embedding_cache_dir, f"{type(self).__name__}-{prints}")
        return self._text_cache

    def prompt_embeddings(self, input_ids: torch.Tensor) -> Embeddings:
        """:meth:`encode_prompt` of token ids, read from the text-embedding cache when it is on."""
        cache = self.text_cache
        if cache is None:
            return self.encode_prompt(input_ids)
        hidden, pooled = cache.get(input_ids, self.encode_prompt)  # stored in the encoders' own dtypes
        return hidden.to(self.device), None if pooled is None else pooled.to(self.device)

    def fill_text_cache(self, prompts: list[str], batch_size: int = 32) -> int:
        """Encode every prompt the text-embedding cache lacks, and the empty prompt; returns the chunks encoded."""
        cache = self.text_cache
        if cache is None:
            return 0
        progress = self._trainer is None or self.trainer.progress_bar_callback is not None
        return cache.fill([*prompts, ""], self.tokenize, self.encode_prompt, batch_size, progress=progress)

    def fill_text_cache_for_fit(self, extra_prompts: list[str]) -> None:
        """At the start of fitting: rank 0 encodes the captions of every split of the data module
        (and ``extra_prompts``) into the cache, the other ranks wait for it."""
        if self.text_cache is None:
            return
        if self.trainer.is_global_zero:
            data = getattr(self.trainer, "datamodule", None)
            prompts = [c for ds in getattr(data, "datasets", {}).values() for c in getattr(ds, "captions", [])]
            self.fill_text_cache(prompts + list(extra_prompts))
        self.trainer.strategy.barrier("text_embedding_cache")
