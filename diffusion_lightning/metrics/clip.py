"""CLIP score (text-image agreement) with a CLIP model read from a local folder.

The score is torchmetrics' ``CLIPScore``: ``100 * cos(image embedding, text embedding)`` per
sample, averaged and clamped at 0. The model never comes from the Hub: ``model_path`` is a folder
holding a transformers ``CLIPModel`` and ``CLIPProcessor`` (``save_pretrained`` output).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore

from diffusion_lightning.metrics.features import check_image_range
from diffusion_lightning.utils.compat import clip_score_update

__all__ = ["CLIPScorer", "clip_score"]


def _check_folder(model_path: str | Path) -> Path:
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model_path={str(model_path)!r} is not a folder; expected a local folder holding a transformers "
            "CLIPModel and CLIPProcessor (save_pretrained output, with config.json)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model_path={str(model_path)!r} has no config.json; expected a local folder holding a transformers "
            "CLIPModel and CLIPProcessor (save_pretrained output)."
        )
    return folder.resolve()


class _TensorFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return the projected embeddings as tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (embeddings in ``pooler_output``);
    torchmetrics 1.9 expects a tensor and fails on ``.norm``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class CLIPScorer:
    """A CLIP model loaded once from a local folder; call it to score images against prompts.

    Args:
        model_path: A folder with a transformers ``CLIPModel`` and ``CLIPProcessor``
            (tokenizer and image processor).

    Raises:
        FileNotFoundError: ``model_path`` is not such a folder.
    """

    def __init__(self, model_path: str | Path) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model_path = _check_folder(model_path)
        try:
            model = CLIPModel.from_pretrained(self.model_path, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(self.model_path, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(
                f"model_path={str(model_path)!r} does not hold a complete CLIPModel + CLIPProcessor "
                f"(weights, tokenizer and image processor files): {err}"
            ) from err
        model.eval().requires_grad_(False)
        features = _TensorFeatures(model)
        # torchmetrics only takes Hub names or a callable returning (model, processor): a local path is refused.
        self.metric = CLIPScore(model_name_or_path=lambda: (features, processor))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 32) -> dict[str, Any]:
        """Score each image against its prompt.

        Args:
            images: ``(B, C, H, W)`` floats in ``[0, 1]``, 1 or 3 channels.
            prompts: ``B`` prompts, one per image.
            batch_size: Images per forward pass.

        Returns:
            ``{"clip_score": float, "per_sample": (B,) tensor}``: ``per_sample`` is
            ``100 * cos(image, text)`` for each pair (may be negative), ``clip_score`` is
            ``max(per_sample.mean(), 0)``, exactly torchmetrics' ``CLIPScore``.

        Raises:
            ValueError: Bad images, a prompt count that is not the image count, or a bad batch size.
        """
        check_image_range(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; give one prompt per image.")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        channels = images.shape[1]
        if channels == 1:
            images = images.expand(-1, 3, -1, -1)
        elif channels != 3:
            raise ValueError(f"images must have 1 or 3 channels, got {channels}.")
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)  # the processor rescales by 1/255
        scores = []
        for start in range(0, len(prompts), batch_size):
            score, _ = clip_score_update(
                pixels[start : start + batch_size],
                prompts[start : start + batch_size],
                self.metric.model,
                self.metric.processor,
            )
            scores.append(score.float().cpu())
        per_sample = torch.cat(scores)
        return {"clip_score": max(per_sample.mean().item(), 0.0), "per_sample": per_sample}


@functools.lru_cache(maxsize=2)
def _scorer(folder: str) -> CLIPScorer:
    return CLIPScorer(folder)


def clip_score(
    images: torch.Tensor, prompts: Sequence[str], model_path: str | Path, batch_size: int = 32
) -> dict[str, Any]:
    """CLIP score of images against their prompts with the CLIP model in ``model_path``.

    The loaded model is cached per folder, so repeated calls do not reload it. See
    :meth:`CLIPScorer.__call__` for the arguments and the result.
    """
    return _scorer(str(_check_folder(model_path)))(images, prompts, batch_size=batch_size)
