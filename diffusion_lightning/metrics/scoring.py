"""Scoring samples group by group: a group is a class (class models) or a prompt (text models).

:class:`Groups` says how the samples asked for some conditions are grouped, which class the digit
judge should read in each (the class itself, or the digit its prompt names, see
:mod:`~diffusion_lightning.metrics.prompts`) and which text CLIP compares each with (the class's
``clip_prompt``, or the prompt itself). :func:`score_groups` runs every metric of an
:class:`~diffusion_lightning.metrics.evaluator.Evaluator` on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from diffusion_lightning.metrics.distribution import fid, inception_score, kid
from diffusion_lightning.metrics.features import check_image_range
from diffusion_lightning.metrics.judge import judge_scores, summarize
from diffusion_lightning.metrics.manifold import manifold_scores
from diffusion_lightning.metrics.prompts import prompt_classes as classes_of_prompts
from diffusion_lightning.metrics.report import EvaluationResult
from diffusion_lightning.pipelines.conditioning import Conditions

if TYPE_CHECKING:
    from diffusion_lightning.metrics.evaluator import Evaluator
    from diffusion_lightning.metrics.features import FeatureExtractor

__all__ = ["Groups", "score_groups"]


@dataclass(frozen=True)
class Groups:
    """The group of every sample, and what the judge and CLIP compare it with.

    Args:
        kind: ``class`` or ``prompt``.
        labels: The group of each sample ``(N,)``: its class, or its prompt's index in ``prompts``.
        class_names: Names of the classes, indexed by class (``class`` kind, optional).
        prompts: The distinct prompts, indexed by group (``prompt`` kind).
        targets: The class the judge should read in each sample ``(N,)``; ``None`` without the judge.
        texts: The text CLIP compares each sample with.
    """

    kind: str
    labels: torch.Tensor
    class_names: list[str] | None
    prompts: list[str] | None
    targets: torch.Tensor | None
    texts: list[str]

    @classmethod
    def of(
        cls,
        conditions: Conditions | torch.Tensor,
        class_names: list[str] | None = None,
        prompt_classes: Mapping[str, int] | None = None,
        judged: bool = False,
        num_classes: int | None = None,
        clip_prompt: str = "{name}",
    ) -> Groups:
        """The groups of samples asked for ``conditions`` (:class:`Conditions`, or class labels ``(N,)``).

        Args:
            conditions: One condition per sample.
            class_names: Names of the classes (class conditions); default the conditions' names when
                they are not just the class numbers.
            prompt_classes: Explicit classes of prompts for the judge.
            judged: Whether the judge scores the samples (prompts then need a class).
            num_classes: The judge's number of classes.
            clip_prompt: CLIP's text of a class, ``{name}`` its name.

        Raises:
            ValueError: With the judge, a prompt that names no single digit and has no explicit
                class, or a class outside the judge's (see :func:`~diffusion_lightning.metrics.prompts.prompt_classes`).
        """
        if isinstance(conditions, torch.Tensor):
            if conditions.ndim != 1 or conditions.is_floating_point():
                shape = tuple(conditions.shape)
                raise ValueError(f"labels must be integer classes (N,), got {conditions.dtype} {shape}.")
            labels = conditions.long().cpu()
        elif conditions.kind == "class":
            labels = torch.tensor([int(v) for v in conditions.values], dtype=torch.long)
            if class_names is None and any(n != str(v) for v, n in zip(conditions.values, conditions.names)):
                named = dict(zip((int(v) for v in conditions.values), conditions.names))
                class_names = [named.get(c, str(c)) for c in range(max(named) + 1)]
        else:
            labels = conditions.groups()
            prompts = list(conditions.distinct().values)
            targets = None
            if judged:
                classes = torch.tensor(classes_of_prompts(prompts, prompt_classes, num_classes), dtype=torch.long)
                targets = classes[labels]
            return cls("prompt", labels, None, prompts, targets, list(conditions.values))
        names = class_names or [str(c) for c in range(int(labels.max()) + 1 if labels.numel() else 0)]
        texts = [clip_prompt.format(name=names[c]) for c in labels.tolist()]
        return cls("class", labels, class_names, None, labels if judged else None, texts)


def _encode(evaluator: Evaluator, extractor: FeatureExtractor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in images.split(evaluator.config.batch_size):
        for name, value in extractor.encode(batch).items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def score_groups(evaluator: Evaluator, images: torch.Tensor, groups: Groups) -> EvaluationResult:
    """Score images in ``[0, 1]`` with every metric of ``evaluator``, overall and per group."""
    check_image_range(images)
    labels = groups.labels
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({images.shape[0]},).")
    config, metrics = evaluator.config, set(evaluator.config.metrics)
    judge_space, extractor = evaluator.judge_features, evaluator.extractor
    members = sorted(set(labels.tolist()))
    values: dict[str, float] = {}
    per_sample: dict[str, torch.Tensor] = {}
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    confusion = None
    judged = _encode(evaluator, judge_space, images) if judge_space is not None else None
    if "judge" in metrics and judged is not None:
        assert groups.targets is not None
        scores = judge_scores(judged["logits"], groups.targets, config.threshold)
        per_sample.update(scores)
        for name in ("is_digit", "correct_digit", "class_probability"):
            summaries[name] = summarize(scores[name], labels, members)
        values["accuracy"] = summaries["correct_digit"]["overall"]["avg"]
        values[f"weakest_{groups.kind}_accuracy"] = min(summaries["correct_digit"][str(g)]["avg"] for g in members)
        num_classes = judged["logits"].shape[1]
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        wanted = groups.targets.clamp(max=num_classes - 1)
        confusion.index_put_((wanted, scores["predicted"]), torch.ones_like(wanted), accumulate=True)
    space = judge_space or extractor
    if "precision_recall" in metrics and space is not None:
        fake = judged if judged is not None and space is judge_space else _encode(evaluator, space, images)
        reference = evaluator.reference(space)
        radii = reference.radii(config.k)
        manifold = manifold_scores(reference.features, fake["features"], k=config.k, real_radii=radii)
        values.update(precision=manifold.precision, recall=manifold.recall)
        per_sample["realism"] = manifold.realism
        per_sample["in_real_manifold"] = manifold.in_real_manifold.float()
        summaries["realism"] = summarize(manifold.realism, labels, members)
    if metrics & {"fid", "kid", "is"} and extractor is not None:
        extracted = judged if judged is not None and extractor is judge_space else _encode(evaluator, extractor, images)
        reference = evaluator.reference(extractor)
        if "fid" in metrics:
            values["fid"] = fid(reference.features, extracted["features"])
        if "kid" in metrics:
            values["kid"], values["kid_std"] = kid(
                reference.features, extracted["features"], subsets=config.kid_subsets, seed=config.seed
            )
        if "is" in metrics:
            values["inception_score"], values["inception_score_std"] = inception_score(
                extracted["logits"], splits=min(10, len(labels)), seed=config.seed
            )
    lpips_per_group: dict[int, float] = {}
    if evaluator.lpips is not None:
        diversity = evaluator.lpips.diversity(images, labels, generator=torch.Generator().manual_seed(config.seed))
        values["lpips_diversity"] = diversity["mean"]
        lpips_per_group = {int(g): v for g, v in diversity["per_class"].items()}
    if evaluator.clip is not None:
        clip = evaluator.clip(images, groups.texts)
        values["clip_score"] = clip["clip_score"]
        per_sample["clip_score"] = clip["per_sample"]
        summaries["clip_score"] = summarize(clip["per_sample"], labels, members)
    return EvaluationResult(
        config=asdict(config),
        values=values,
        summaries=summaries,
        per_sample=per_sample,
        images=images.cpu(),
        labels=labels,
        class_names=groups.class_names,
        lpips_per_class=lpips_per_group,
        confusion=confusion,
        num_worst=config.num_worst,
        feature_space={"fid": extractor.name if extractor else None, "manifold": space.name if space else None},
        prompts=groups.prompts,
        targets=groups.targets if groups.kind == "prompt" else None,
    )
