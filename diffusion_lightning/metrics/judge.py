"""The digit judge: a trained classifier answers "is it a digit?", "which digit?" and "how real?".

The three questions a rater (or a hosted LLM) would be asked about a generated digit, answered
offline and deterministically by :class:`~diffusion_lightning.DigitClassifier`:

- ``is_digit``: the judge's highest class probability reaches ``threshold`` (it reads *some*
  digit with confidence);
- ``correct_digit``: the judge's reading equals the requested class;
- ``class_probability``: the judge's probability of the requested class (a graded
  ``correct_digit``, and the ranking of the worst samples);
- ``realism`` (from :mod:`~diffusion_lightning.metrics.manifold`): how typical of real digits the
  sample is in the judge's feature space, in place of a 1-5 "written by a human?" score.

The requested class is the class of a class-conditioned sample, or the digit a text-to-image
sample's prompt names (see :mod:`~diffusion_lightning.metrics.prompts`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_JUDGE", "JudgeMissing", "judge_scores", "load_judge", "summarize"]

#: Where ``configs/classifier_mnist.yaml`` leaves the judge.
DEFAULT_JUDGE = "outputs/classifier_mnist/checkpoints/last.ckpt"

TRAIN_JUDGE = "diffusion-lightning fit --config configs/classifier_mnist.yaml"


class JudgeMissing(FileNotFoundError):
    """No judge checkpoint where one was asked for."""


def load_judge(path: str | os.PathLike[str] | None = None, map_location: str = "cpu"):  # noqa: ANN201
    """A trained :class:`~diffusion_lightning.DigitClassifier` from ``path`` (default :data:`DEFAULT_JUDGE`).

    In eval mode; a missing file raises :class:`JudgeMissing` with the command that trains one.
    """
    from diffusion_lightning.modules.classifier import DigitClassifier

    path = Path(path or DEFAULT_JUDGE)
    if not path.is_file():
        raise JudgeMissing(
            f"judge={str(path)!r} does not exist. Train the digit judge (about a minute on 2 CPU cores) with "
            f"`{TRAIN_JUDGE}` or pass --judge PATH to a DigitClassifier checkpoint."
        )
    judge = DigitClassifier.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    return judge.eval()


def judge_scores(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.7) -> dict[str, torch.Tensor]:
    """Per-sample ``is_digit``, ``correct_digit`` (0/1 floats), ``class_probability`` and ``predicted``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in (0, 1].")
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    probs = logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    labels = labels.long()
    return {
        "is_digit": (confidence >= threshold).float(),
        "correct_digit": (predicted == labels).float(),
        "class_probability": probs.gather(1, labels.unsqueeze(1)).squeeze(1),
        "predicted": predicted,
    }


def summarize(values: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> dict[str, dict[str, float]]:
    """``{"avg", "min", "max", "n"}`` of ``values`` per class (keys ``str(c)``) and ``overall``."""
    values = values.double()
    out: dict[str, dict[str, float]] = {}
    for c in classes:
        selected = values[labels == c]
        if selected.numel():
            out[str(c)] = {
                "avg": selected.mean().item(),
                "min": selected.min().item(),
                "max": selected.max().item(),
                "n": selected.numel(),
            }
    out["overall"] = {
        "avg": values.mean().item(),
        "min": values.min().item(),
        "max": values.max().item(),
        "n": values.numel(),
    }
    return out
