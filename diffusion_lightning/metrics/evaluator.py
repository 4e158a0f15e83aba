"""Generate from a class-conditioned pipeline and score the samples: one path for the CLI and callbacks.

:class:`Evaluator` is what ``diffusion-lightning evaluate``, the periodic evaluation of
:class:`~diffusion_lightning.callbacks.DiffusionMetricsLogger` and ``benchmarks/quality_mnist.py``
share: it resolves every network a metric needs when it is built (so a missing weights file fails
before minutes of sampling, not after), generates ``n_samples`` images spread evenly over the
classes from a seeded CPU generator, and scores them into an
:class:`~diffusion_lightning.metrics.report.EvaluationResult`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_lightning.losses import check_choice
from diffusion_lightning.metrics.distribution import fid, inception_score, kid
from diffusion_lightning.metrics.features import DigitFeatures, FeatureExtractor, check_image_range
from diffusion_lightning.metrics.judge import judge_scores, load_judge, summarize
from diffusion_lightning.metrics.manifold import manifold_scores
from diffusion_lightning.metrics.reference import RealReference, real_reference
from diffusion_lightning.metrics.report import EvaluationResult

__all__ = ["DEFAULT_METRICS", "METRICS", "EvaluationConfig", "Evaluator"]

#: Every metric the evaluator knows.
METRICS = ("judge", "fid", "kid", "precision_recall", "is", "lpips", "clip")
#: The ones that need no weights beyond the digit judge.
DEFAULT_METRICS = ("judge", "fid", "kid", "precision_recall")
FEATURE_EXTRACTORS = ("auto", "digits", "inception")

log = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    """What to generate and how to score it.

    Args:
        n_samples: Images to generate, spread evenly over the classes (lower classes get the extra ones).
        num_inference_steps: Sampling steps; ``None``: the caller's default (the model's).
        guidance_scale: Classifier-free guidance scale; ``None``: the caller's default.
        scheduler: Sampling scheduler name (``ddpm``, ``ddim``, ``dpm``, ...); ``None`` keeps the pipeline's.
        seed: Seed of the CPU generator that draws all the noise.
        batch_size: Images per pipeline call and per feature-extractor call.
        metrics: A subset of :data:`METRICS`.
        feature_extractor: Feature space of FID/KID: ``inception`` (InceptionV3 from local weights;
            comparable to published FIDs; an error when the weights are missing), ``digits`` (the
            judge's penultimate layer: a domain FID), or ``auto`` (InceptionV3 when its weights are
            on disk, the judge's features otherwise; ``metrics.json`` records which).
        judge: Path of a :class:`~diffusion_lightning.DigitClassifier` checkpoint (default
            ``outputs/classifier_mnist/checkpoints/last.ckpt``).
        inception_weights: InceptionV3 weights file (default: the torch hub cache).
        lpips_weights: The LPIPS backbone's ImageNet weights (default: the torch hub cache).
        allow_random_lpips: Report LPIPS from a randomly initialised backbone (not comparable).
        clip_model: Local folder of a CLIP model for ``clip``.
        clip_prompt: Prompt per class for ``clip``; ``{name}`` is the class name.
        reference_split: Split of real images the generated ones are compared with.
        cache_dir: Cache of real-image features (default ``~/.cache/diffusion_lightning``).
        threshold: Judge probability above which a sample counts as ``is_digit``.
        k: Neighbour that sets the manifold balls of precision/recall/realism.
        num_worst: Samples in the worst-samples grid.
        kid_subsets: Random subsets KID averages over.
        progress: Show progress bars.
    """

    n_samples: int = 500
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int = 0
    batch_size: int = 50
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    feature_extractor: str = "auto"
    judge: str | None = None
    inception_weights: str | None = None
    lpips_weights: str | None = None
    allow_random_lpips: bool = False
    clip_model: str | None = None
    clip_prompt: str = "a handwritten digit {name}"
    reference_split: str = "train"
    cache_dir: str | None = None
    threshold: float = 0.7
    k: int = 3
    num_worst: int = 16
    kid_subsets: int = 100
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_samples", "batch_size", "k", "num_worst", "kid_subsets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not accepted; expected an int >= 1.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps!r} must be >= 1 or None.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be >= 0 or None.")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics={list(self.metrics)!r} is not accepted; choose from {list(METRICS)}.")
        check_choice("feature_extractor", self.feature_extractor, FEATURE_EXTRACTORS)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1].")
        if "is" in self.metrics and self.feature_extractor == "digits":
            raise ValueError(
                "metrics includes 'is' (Inception Score), which needs InceptionV3: feature_extractor='inception' "
                "(or 'auto' with its weights on disk), not 'digits'."
            )
        if "clip" in self.metrics and not self.clip_model:
            raise ValueError("metrics includes 'clip'; give clip_model, a local folder with a CLIP model.")


class Evaluator:
    """Generate and score class-conditioned samples.

    Args:
        config: What to generate and measure.
        datamodule: Real images (default the embedded MNIST digits); the reference split comes from it.
        judge: An already loaded :class:`~diffusion_lightning.DigitClassifier` (else ``config.judge`` is loaded).
    """

    def __init__(self, config: EvaluationConfig | None = None, datamodule: Any = None, judge: Any = None) -> None:
        self.config = config = config or EvaluationConfig()
        if datamodule is None:
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

            self.clip = CLIPScorer(config.clip_model)
        self._references: dict[str, RealReference] = {}

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

    # ------------------------------------------------------------------ generation

    def labels(self, num_classes: int) -> torch.Tensor:
        """``n_samples`` class labels, as even as possible, sorted."""
        return torch.arange(self.config.n_samples) % num_classes if num_classes else torch.zeros(0)

    def generate(
        self, pipeline: Any, num_inference_steps: int = 25, guidance_scale: float = 2.0
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(images in [0, 1], labels, seconds)`` from ``pipeline``; the config's steps/scale override these."""
        config = self.config
        steps = config.num_inference_steps or num_inference_steps
        scale = guidance_scale if config.guidance_scale is None else config.guidance_scale
        if config.scheduler:
            from diffusion_lightning.schedulers import make_scheduler

            pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
        labels = self.labels(pipeline.num_classes).sort().values
        generator = torch.Generator().manual_seed(config.seed)
        pipeline.set_progress_bar_config(disable=True)
        images = []
        start = time.perf_counter()
        batches = labels.split(config.batch_size)
        for batch in tqdm(batches, desc=f"generating ({steps} steps)", disable=not config.progress, leave=False):
            out = pipeline(
                batch, num_inference_steps=steps, guidance_scale=scale, generator=generator, output_type="pt"
            )
            images.append(out.images.float().cpu())
        self.last_sampling = {"num_inference_steps": steps, "guidance_scale": scale}
        return torch.cat(images), labels, time.perf_counter() - start

    # ------------------------------------------------------------------ scoring

    def reference(self, extractor: FeatureExtractor) -> RealReference:
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

    def _encode(self, extractor: FeatureExtractor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in images.split(self.config.batch_size):
            for name, value in extractor.encode(batch).items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def score(
        self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None
    ) -> EvaluationResult:
        """Score images in ``[0, 1]`` that were asked to show ``labels``."""
        check_image_range(images)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({images.shape[0]},).")
        config, metrics = self.config, set(self.config.metrics)
        labels = labels.long().cpu()
        classes = sorted(set(labels.tolist()))
        values: dict[str, float] = {}
        per_sample: dict[str, torch.Tensor] = {}
        summaries: dict[str, dict[str, dict[str, float]]] = {}
        confusion = None
        judged = self._encode(self.judge_features, images) if self.judge_features is not None else None
        if "judge" in metrics and judged is not None:
            scores = judge_scores(judged["logits"], labels, config.threshold)
            per_sample.update(scores)
            for name in ("is_digit", "correct_digit", "class_probability"):
                summaries[name] = summarize(scores[name], labels, classes)
            per_class_accuracy = [summaries["correct_digit"][str(c)]["avg"] for c in classes]
            values["accuracy"] = summaries["correct_digit"]["overall"]["avg"]
            values["weakest_class_accuracy"] = min(per_class_accuracy)
            num_classes = judged["logits"].shape[1]
            confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
            confusion.index_put_(
                (labels.clamp(max=num_classes - 1), scores["predicted"]), torch.ones_like(labels), accumulate=True
            )
        space = self.judge_features or self.extractor
        if "precision_recall" in metrics and space is not None:
            fake = (
                judged["features"]
                if judged is not None and space is self.judge_features
                else self._encode(space, images)["features"]
            )
            reference = self.reference(space)
            manifold = manifold_scores(reference.features, fake, k=config.k, real_radii=reference.radii(config.k))
            values.update(precision=manifold.precision, recall=manifold.recall)
            per_sample["realism"] = manifold.realism
            per_sample["in_real_manifold"] = manifold.in_real_manifold.float()
            summaries["realism"] = summarize(manifold.realism, labels, classes)
        extracted = None
        if metrics & {"fid", "kid", "is"} and self.extractor is not None:
            extracted = judged if self.extractor is self.judge_features else self._encode(self.extractor, images)
            reference = self.reference(self.extractor)
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
        lpips_per_class: dict[int, float] = {}
        if self.lpips is not None:
            diversity = self.lpips.diversity(images, labels, generator=torch.Generator().manual_seed(config.seed))
            values["lpips_diversity"] = diversity["mean"]
            lpips_per_class = {int(c): v for c, v in diversity["per_class"].items()}
        if self.clip is not None:
            names = class_names or [str(c) for c in range(max(classes) + 1)]
            prompts = [config.clip_prompt.format(name=names[c]) for c in labels.tolist()]
            clip = self.clip(images, prompts)
            values["clip_score"] = clip["clip_score"]
            per_sample["clip_score"] = clip["per_sample"]
            summaries["clip_score"] = summarize(clip["per_sample"], labels, classes)
        return EvaluationResult(
            config=asdict(config),
            values=values,
            summaries=summaries,
            per_sample=per_sample,
            images=images.cpu(),
            labels=labels,
            class_names=class_names,
            lpips_per_class=lpips_per_class,
            confusion=confusion,
            num_worst=config.num_worst,
            feature_space={
                "fid": self.extractor.name if self.extractor else None,
                "manifold": space.name if space else None,
            },
        )

    def evaluate(self, pipeline: Any, num_inference_steps: int = 25, guidance_scale: float = 2.0) -> EvaluationResult:
        """Generate with ``pipeline`` and score the samples (the sampling cost is in ``seconds_per_image``)."""
        images, labels, seconds = self.generate(pipeline, num_inference_steps, guidance_scale)
        result = self.score(images, labels, pipeline.config.get("class_names"))
        result.values["seconds_per_image"] = seconds / max(len(labels), 1)
        result.sampling = dict(self.last_sampling, scheduler=type(pipeline.scheduler).__name__)
        return result
