"""Generate from any pipeline this package drives and score the samples: one path for the CLI and callbacks.

:class:`Evaluator` is what ``diffusion-lightning evaluate``, the periodic evaluation of
:class:`~diffusion_lightning.callbacks.DiffusionMetricsLogger` and ``benchmarks/quality_mnist.py``
share: it resolves every network a metric needs when it is built (so a missing weights file fails
before minutes of sampling, not after), generates ``n_samples`` images spread evenly over the
conditions (a class model's classes, a text model's prompts) through
:func:`~diffusion_lightning.pipelines.conditioning.generate` from a seeded CPU generator, and scores
them, group by group (class or prompt), into an
:class:`~diffusion_lightning.metrics.report.EvaluationResult` (see :mod:`~diffusion_lightning.metrics.scoring`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_lightning.metrics.config import DEFAULT_METRICS, FEATURE_EXTRACTORS, METRICS, EvaluationConfig
from diffusion_lightning.metrics.features import DigitFeatures, FeatureExtractor
from diffusion_lightning.metrics.judge import load_judge
from diffusion_lightning.metrics.reference import RealReference, real_reference
from diffusion_lightning.metrics.report import EvaluationResult
from diffusion_lightning.metrics.scoring import Groups, score_groups
from diffusion_lightning.pipelines.conditioning import Conditions, condition_spec, generate

__all__ = ["DEFAULT_METRICS", "FEATURE_EXTRACTORS", "METRICS", "EvaluationConfig", "Evaluator"]

log = logging.getLogger(__name__)


class Evaluator:
    """Generate and score samples of class-conditioned and text-to-image pipelines.

    Args:
        config: What to generate and measure.
        datamodule: Real images the samples are compared with (default the embedded MNIST digits):
            its ``config.reference_split``. ``config.reference``, a folder, takes its place when set.
        judge: An already loaded :class:`~diffusion_lightning.DigitClassifier` (else ``config.judge`` is loaded).
    """

    def __init__(self, config: EvaluationConfig | None = None, datamodule: Any = None, judge: Any = None) -> None:
        self.config = config = config or EvaluationConfig()
        if config.reference:
            from diffusion_lightning.metrics.folders import FolderReference

            datamodule = FolderReference(config.reference, config.reference_size)
        elif datamodule is None:
            from diffusion_lightning.data.mnist import MNISTDataModule

            datamodule = MNISTDataModule()
        self.datamodule = datamodule
        metrics = set(config.metrics)
        self.feature_extractor = self._resolve_extractor(config)
        needs_judge = "judge" in metrics or (
            self.feature_extractor == "digits" and metrics & {"fid", "kid", "precision_recall"}
        )
        self.judge_features = (
            DigitFeatures(judge if judge is not None else load_judge(config.judge)) if needs_judge else None
        )
        self.extractor: FeatureExtractor | None = self.judge_features
        if self.feature_extractor == "inception" and metrics & {"fid", "kid", "is"}:
            from diffusion_lightning.metrics.inception import InceptionFeatures

            self.extractor = InceptionFeatures(config.inception_weights)
        self.lpips = None
        if "lpips" in metrics:
            from diffusion_lightning.metrics.lpips import LPIPSDiversity

            self.lpips = LPIPSDiversity(
                backbone_weights=config.lpips_weights, allow_random_backbone=config.allow_random_lpips
            )
        self.clip = None
        if "clip" in metrics:
            from diffusion_lightning.metrics.clip import CLIPScorer

            assert config.clip_model is not None  # EvaluationConfig refuses clip without it
            self.clip = CLIPScorer(config.clip_model)
        self._references: dict[str, RealReference] = {}
        self.last_sampling: dict[str, Any] = {}

    @staticmethod
    def _resolve_extractor(config: EvaluationConfig) -> str:
        """``auto`` becomes ``inception`` when its weights are on disk, else ``digits``."""
        if config.feature_extractor != "auto" or not set(config.metrics) & {"fid", "kid", "is"}:
            return config.feature_extractor
        from diffusion_lightning.metrics.inception import InceptionWeightsMissing, resolve_inception_weights

        try:
            resolve_inception_weights(config.inception_weights)
        except InceptionWeightsMissing:
            if "is" in config.metrics:
                raise
            log.info("No InceptionV3 weights on disk: FID/KID use the digit judge's features (a domain FID).")
            return "digits"
        return "inception"

    # ------------------------------------------------------------------ what to generate

    def conditions(self, pipeline: Any, conditions: Conditions | None = None) -> Conditions:
        """The ``n_samples`` conditions to generate with ``pipeline``, spread evenly and grouped (``a a b b c``).

        Args:
            pipeline: A class-conditioned or text-to-image pipeline (or anything with ``condition_spec()``).
            conditions: What to evaluate, spread over ``n_samples``; ``None``: every class of a class
                model, ``config.prompts`` (else the model's default prompts) of a text model.

        Raises:
            ValueError: naming the field, when the request does not fit the pipeline (prompts for a
                class model, no prompts for a text model, conditions of the other kind), or when the
                judge or LPIPS cannot score what would be generated.
        """
        spec = condition_spec(pipeline)
        if conditions is None:
            conditions = spec.resolve(prompts=self.config.prompts, owner="evaluation")
        elif conditions.kind != spec.kind:
            raise ValueError(
                f"conditions are of kind {conditions.kind!r}, but the pipeline is conditioned on {spec.kind!r}s; "
                f"give {spec.kind} conditions (or None for the default ones)."
            )
        conditions = conditions.spread(self.config.n_samples)
        groups = self.groups(conditions)  # the judge's classes of the prompts: fails now, not after sampling
        if self.lpips is not None and int(groups.labels.bincount().max()) < 2:
            raise ValueError(
                f"n_samples={self.config.n_samples} gives each of the {len(conditions.distinct())} "
                f"{conditions.kind}s one sample; LPIPS diversity needs two per {conditions.kind}: raise n_samples "
                f"to at least {2 * len(conditions.distinct())} or drop lpips from metrics."
            )
        return conditions

    def groups(self, conditions: Conditions | torch.Tensor, class_names: list[str] | None = None) -> Groups:
        """How samples asked for ``conditions`` (or class ``labels``) are grouped and judged."""
        judge = self.judge_features if "judge" in self.config.metrics else None
        num_classes = int(judge.classifier.hparams["num_classes"]) if judge is not None else None
        return Groups.of(
            conditions,
            class_names,
            prompt_classes=self.config.prompt_classes,
            judged=judge is not None,
            num_classes=num_classes,
            clip_prompt=self.config.clip_prompt,
        )

    # ------------------------------------------------------------------ generation

    def _sampling(self, pipeline: Any, num_inference_steps: int, guidance_scale: float) -> tuple[int, float]:
        config = self.config
        steps = config.num_inference_steps or num_inference_steps
        scale = guidance_scale if config.guidance_scale is None else config.guidance_scale
        if config.scheduler:
            from diffusion_lightning.schedulers import make_scheduler

            pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
        return steps, scale

    def generate(
        self,
        pipeline: Any,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        conditions: Conditions | None = None,
        image_size: int | None = None,
    ) -> tuple[torch.Tensor, Conditions, float]:
        """``(images in [0, 1], their conditions, seconds)`` from ``pipeline``.

        Args:
            pipeline: A class-conditioned or text-to-image pipeline.
            num_inference_steps: Denoising steps, unless ``config.num_inference_steps`` is set.
            guidance_scale: Guidance scale, unless ``config.guidance_scale`` is set.
            conditions: What to generate (see :meth:`conditions`); ``None``: the defaults.
            image_size: Height and width of text-to-image samples (default: the pipeline's).
        """
        config = self.config
        conditions = self.conditions(pipeline, conditions)
        steps, scale = self._sampling(pipeline, num_inference_steps, guidance_scale)
        generator = torch.Generator().manual_seed(config.seed)
        pipeline.set_progress_bar_config(disable=True)
        images = []
        start = time.perf_counter()
        batches = range(0, len(conditions), config.batch_size)
        for first in tqdm(batches, desc=f"generating ({steps} steps)", disable=not config.progress, leave=False):
            batch = conditions[first : first + config.batch_size]
            images.append(
                generate(
                    pipeline,
                    batch,
                    num_inference_steps=steps,
                    guidance_scale=scale,
                    generator=generator,
                    image_size=image_size,
                )
            )
        self.last_sampling = {"num_inference_steps": steps, "guidance_scale": scale, "image_size": image_size}
        return torch.cat(images), conditions, time.perf_counter() - start

    # ------------------------------------------------------------------ scoring

    def reference(self, extractor: FeatureExtractor) -> RealReference:
        """The real images' features in ``extractor``'s space (computed once, cached on disk)."""
        if extractor.name not in self._references:
            self._references[extractor.name] = real_reference(
                self.datamodule,
                extractor,
                split=self.config.reference_split,
                cache_dir=self.config.cache_dir,
                batch_size=self.config.batch_size,
                progress=self.config.progress,
            )
        return self._references[extractor.name]

    def score(
        self, images: torch.Tensor, conditions: Conditions | torch.Tensor, class_names: list[str] | None = None
    ) -> EvaluationResult:
        """Score images in ``[0, 1]`` that were asked to show ``conditions``.

        Args:
            images: ``(N, C, H, W)`` in ``[0, 1]``.
            conditions: One condition per image: :class:`Conditions`, or class labels ``(N,)``.
            class_names: Names of the classes (class conditions).
        """
        return score_groups(self, images, self.groups(conditions, class_names))

    def evaluate(
        self,
        pipeline: Any,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        conditions: Conditions | None = None,
        image_size: int | None = None,
    ) -> EvaluationResult:
        """Generate with ``pipeline`` (see :meth:`generate`) and score the samples.

        The sampling cost is in ``seconds_per_image``, how the samples were drawn in ``sampling``.
        """
        images, conditions, seconds = self.generate(
            pipeline, num_inference_steps, guidance_scale, conditions=conditions, image_size=image_size
        )
        spec = condition_spec(pipeline)
        result = self.score(images, conditions, list(spec.class_names) if spec.class_names else None)
        result.values["seconds_per_image"] = seconds / max(len(conditions), 1)
        result.sampling = dict(self.last_sampling, scheduler=type(pipeline.scheduler).__name__)
        return result
